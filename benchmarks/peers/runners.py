"""One runner per system of ``bench_peers.py``: each answers one question at a time and says what it reported.

A runner is a context manager (it starts what it needs and stops it) with ``solve(question, seed) -> Answer`` (only
ponder uses the seed: the peers take no per-question seed). The remote runners talk only to ``base_url``, the
counting proxy's URL for that system; the in-process one loads the model.
Peer code runs in the peer's venv: optillm as its own proxy server (as its README tells a user to run it), its_hub
through ``its_hub_driver.py``; this process only speaks HTTP or JSON lines to them.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import ponder
from ponder.answers import extract_answer
from ponder.engine.remote import OpenAIEngine
from ponder.models import load_engine
from ponder.prompts import math_messages
from ponder.server.process import ServerProcess, free_port
from ponder.verifiers.llm import SELF_CHECK

from .venvs import ensure_venv

DRIVER = Path(__file__).resolve().parent / "its_hub_driver.py"
# The question its_hub's rewards ask, worded as ponder's own self-check (there appended to the solution as text).
VERIFY = SELF_CHECK.strip().removesuffix("Reply:").strip()


@dataclass
class Settings:
    """What every system is given alike."""

    model: str  # the served model's name
    n: int  # samples / candidates / particles
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    max_steps: int  # particle filtering: steps per particle at most


@dataclass
class Answer:
    answer: str | None  # the final answer, extracted with ponder.answers
    text: str | None = None  # the final text it was read from (a peer's reply, ponder's chosen branch)
    reported: dict = field(default_factory=dict)  # the system's own usage report
    error: str | None = None


def user_turn(question: str) -> str:
    """The same prompt for everyone: ponder's default user turn, with no system message."""
    (message,) = math_messages(question)
    return message["content"]


class OptillmRunner:
    """optillm's proxy in front of the counting proxy; approaches are picked by model-name prefix."""

    def __init__(self, approach: str, base_url: str, settings: Settings):
        self.approach, self.base_url, self.settings = approach, base_url, settings
        self.venv = ensure_venv("optillm")
        self.versions = self.venv.installed["versions"]

    def __enter__(self):
        port = free_port()
        command = [str(self.venv.bin("optillm")), "--base-url", self.base_url, "--host", "127.0.0.1",
                   "--port", str(port), "--best-of-n", str(self.settings.n), "--log", "warning"]
        env = {**os.environ, "OPENAI_API_KEY": "none"}  # optillm makes an OpenAI client only when a key is set
        self.server = ServerProcess(command, port, env=env, timeout_s=600).__enter__()
        self.client = httpx.Client(base_url=self.server.url, timeout=3600)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.stop()

    def solve(self, question: str, seed: int) -> Answer:
        s = self.settings
        body = {"model": f"{self.approach}-{s.model}", "messages": [{"role": "user", "content": user_turn(question)}],
                "max_tokens": s.max_tokens, "temperature": s.temperature}
        if self.approach == "majority_voting":
            body["k"] = s.n  # the plugin's sample count (its temperature is the request's)
        reply = self.client.post("/v1/chat/completions", json=body)
        if reply.status_code != 200:
            return Answer(None, error=f"optillm answered {reply.status_code}: {reply.text[:300]}")
        data = reply.json()
        text = data["choices"][0]["message"]["content"] or ""
        return Answer(extract_answer(text), text, reported=data.get("usage") or {})


class ItsHubRunner:
    """its_hub's algorithm in a driver process of its venv, one JSON line per question."""

    def __init__(self, algorithm: str, base_url: str, settings: Settings):
        self.venv = ensure_venv("its_hub")
        self.versions = self.venv.installed["versions"]
        s = settings
        self.config = {"algorithm": algorithm, "base_url": base_url, "model": s.model, "n": s.n,
                       "temperature": s.temperature, "max_tokens": s.max_tokens, "max_steps": s.max_steps,
                       "verify": VERIFY}

    def __enter__(self):
        self.process = subprocess.Popen([str(self.venv.python), str(DRIVER), json.dumps(self.config)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # {"ready": version} once its_hub is imported
        return self

    def __exit__(self, *exc):
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the its_hub driver exited (status {self.process.poll()}); see its stderr above")
        return json.loads(line)

    def solve(self, question: str, seed: int) -> Answer:
        self.process.stdin.write(json.dumps({"question": user_turn(question)}) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        if "error" in reply:
            return Answer(None, error=reply["error"])
        return Answer(extract_answer(reply["text"]), reply["text"], reported=reply["usage"] or {})


class PonderRunner:
    """A ponder strategy on the remote engine (``base_url``) or, with ``base_url=None``, in process."""

    def __init__(self, strategy: str, base_url: str | None, settings: Settings):
        self.strategy, self.base_url, self.settings = strategy, base_url, settings
        self.versions = {"ponder": ponder.__version__}
        # Particle filtering set up as its_hub's is here: the served model judges its own steps (its P(Yes) is the
        # process reward of its_hub-pf), for at most max_steps steps.
        self.options = ({"judge": settings.model, "max_steps": settings.max_steps} if strategy == "particles"
                        else {})

    def __enter__(self):
        if self.base_url is None:
            self.engine = load_engine(self.settings.model)  # the bundled model by name, so the judge= name matches
        else:
            self.engine = OpenAIEngine([self.base_url], self.settings.model)
        return self

    def __exit__(self, *exc):
        self.engine.close()

    def solve(self, question: str, seed: int) -> Answer:
        s = self.settings
        try:
            result = ponder.ask(question, self.strategy, s.n, engine=self.engine, temperature=s.temperature,
                                top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens, seed=seed, **self.options)
        except ponder.PonderError as exc:
            return Answer(None, error=str(exc))
        u = result.usage
        chosen = next((b.text for b in result.branches if b.answer == result.answer), None)
        return Answer(result.answer, chosen, reported={"prompt_tokens": u.prompt_tokens, "completion_tokens":
                                               u.generated_tokens, "scored_tokens": u.scored_tokens})
