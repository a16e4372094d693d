"""The README's code examples run as written (each ```python block after an
`<!-- example: NAME -->` line)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"
EXAMPLES = dict(re.findall(r"<!-- example: (.+?) -->\n```python\n(.*?)```", README.read_text(),
                           re.DOTALL))


def test_the_readme_has_its_examples():
    assert set(EXAMPLES) >= {"torch quantizer", "flax quantizer", "port a model"}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name):
    exec(compile(EXAMPLES[name], f"README.md: {name}", "exec"), {"__name__": "readme"})
