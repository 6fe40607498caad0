"""The fake engine, keeping every chat that is opened on it: for tests of which prompt reaches the model."""

from __future__ import annotations

from ponder.engine.fake import FakeEngine


class RecordingEngine(FakeEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chats: list = []  # each ``open``'s prompt: a list of messages (or a text), in order

    async def open(self, prompt, usage=None, *, model=None):
        self.chats.append(prompt)
        return await super().open(prompt, usage, model=model)
