"""The named chat templates that turn chats into prompt text for remote servers' ``/v1/completions`` (the in-process
engine reads each model's own template from its GGUF metadata instead).

Plain data, no Jinja import: the command line lists the names without loading a renderer.
"""

# Templates for ``chat_template=NAME``; any other value is the path of a Jinja file (a Hugging Face chat template).
# "qwen2.5" renders plain chats exactly as the bundled models' own GGUF template does (default system message included).
CHAT_TEMPLATES = {
    "qwen2.5": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
}
