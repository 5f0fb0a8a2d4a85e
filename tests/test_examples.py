import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_round_trip_example_runs_on_the_twins(tiny_dir, photos, tmp_path):
    photo = tmp_path / "photo.png"
    photos[0].save(photo)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "round_trip.py"), str(photo), "--decoder", str(tiny_dir / "decoder"),
         "--encoder", str(tiny_dir / "encoder"), "--projector", str(tiny_dir / "projector"), "--steps", "2",
         "--max-new-tokens", "6", "--output-prefix", str(tmp_path / "rec")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rec-0.png").exists() and "→" in result.stdout
