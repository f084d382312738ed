"""Stage 2: prompt templates, kept as editable text files outside the code.

A template is a ``str.format`` string. The packaged ones live in ``recbole_llmk/prompts``; any
config key that names a template (e.g. ``reki_user_prompt``) also accepts a path to your own file.
"""

import hashlib
import os
import string

PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prompts")


class PromptTemplate:
    def __init__(self, text, source):
        self.text = text
        self.source = source
        self.fields = {name for _, name, _, _ in string.Formatter().parse(text) if name}

    @classmethod
    def load(cls, name_or_path):
        path = name_or_path if os.path.isfile(name_or_path) else os.path.join(PROMPTS, f"{name_or_path}.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"prompt template '{name_or_path}' not found: give a file path or one of "
                f"{sorted(f[:-4] for f in os.listdir(PROMPTS))}"
            )
        with open(path, encoding="utf-8") as f:
            return cls(f.read().strip(), path)

    @property
    def digest(self):
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def render(self, **values):
        missing = self.fields - set(values)
        if missing:
            raise KeyError(f"{self.source}: placeholders {sorted(missing)} have no value; "
                           f"available: {sorted(values)}")
        return self.text.format(**values)
