"""The README's Unified-Bench section, run as written (the twin backbones in place of the Hub ids)."""

import ast
import contextlib
import io
import re
from pathlib import Path

import evaluate
import pytest

from uae_hf import PAPER_BACKBONES

SECTION = (Path(__file__).parents[1] / "README.md").read_text().split("\n## Unified-Bench\n")[1].split("\n## ")[0]


def test_unified_bench_snippet_as_written(backbone_checkpoints, photos, tmp_path, monkeypatch):
    snippet = SECTION.split("```python\n")[1].split("```")[0]
    promised = re.findall(r'"(\w+)": ', snippet.strip().splitlines()[-1])  # the keys its comment names
    assert promised == [*PAPER_BACKBONES, "overall", "unified_bench"]
    twins = {name: backbone_checkpoints[name] for name in PAPER_BACKBONES}
    loading = 'evaluate.load("unified_bench")'
    assert snippet.count(loading) == 1
    snippet = snippet.replace(loading, f'evaluate.load("unified_bench", checkpoints={twins!r})')
    # the files it names, in the folder it runs from: a reference and, for its reconstruction, another photo
    monkeypatch.chdir(tmp_path)
    photos[0].save("photo.jpg")
    Path("out/reconstructions").mkdir(parents=True)
    photos[1].save("out/reconstructions/photo.png")

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})
    results = ast.literal_eval(printed.getvalue().strip().splitlines()[-1])
    assert list(results) == promised
    for name in PAPER_BACKBONES:  # cosines of two different photos
        assert 0 < results[name] < 0.999, (name, results[name])
    assert results["overall"] == pytest.approx(sum(results[name] for name in PAPER_BACKBONES) / 4)
    assert results["unified_bench"] == pytest.approx(100 * results["overall"])


def test_without_uae_hf_the_bare_name_fails_as_the_readme_says(tmp_path, monkeypatch):
    """What evaluate does with the name on its own (`import uae_hf` wraps its module lookup; the wrapped original is
    evaluate's). The fresh-interpreter load that `import uae_hf` makes work: tests/metrics/test_unified_bench.py."""
    quoted = re.search(r'fails with "\.\.\. ([^"]+)"', " ".join(SECTION.split())).group(1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(quoted)):
        evaluate.loading.evaluation_module_factory.uae_hf_original("unified_bench")
