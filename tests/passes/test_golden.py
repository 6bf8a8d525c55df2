"""Golden IR: the text dump of tiny models after the clean-up pipeline.

A change to what a pass emits shows up here as a diff in review. Regenerate on purpose with
PRUNUS_UPDATE_GOLDEN=1 and read the diff before committing it.
"""
import os

import pytest

from prunus.ir import to_text

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_cleanup_ir_matches_golden(arch, cleaned):
    text = to_text(cleaned(arch).graph)
    path = os.path.join(GOLDEN, f"{arch}_cleanup.txt")
    if os.environ.get("PRUNUS_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read()
