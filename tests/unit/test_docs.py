"""The README's config reference is the schema's (regenerate with `python -m tunesmith.docs`)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.docs import config_reference

README = Path(__file__).parents[2] / "README.md"


def test_readme_config_reference_matches_the_schema() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end].strip() == config_reference().strip(), "run `python -m tunesmith.docs` and paste it"


def test_readme_lists_every_method() -> None:
    from tunesmith.methods import method_descriptions

    text = README.read_text(encoding="utf-8")
    for name in method_descriptions():
        assert f"| `{name}` |" in text, name
