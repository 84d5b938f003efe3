"""What a person reads: the training log line and the image panels written without W&B."""
import torch

from train.logger import duration, progress_line
from train.panels import PanelWriter


def test_log_line_shows_progress_rate_and_eta():
    line = progress_line(120, 1000, {"perf/samples_per_s": 43.12, "perf/s_per_step": 0.37, "loss": 0.4123})
    assert line == "step 120/1000 | 43.1 samples/s | 0.37 s/step | ETA 5m26s | loss=0.4123"
    assert duration(4000) == "1h06m" and duration(12.3) == "12s"


def test_panels_are_pngs_with_a_page_listing_every_step_newest_first(tmp_path):
    writer = PanelWriter(tmp_path / "images", "run")
    batch = torch.rand(3, 3, 16, 16) * 2 - 1
    writer.write({"images/samples": (batch, ["a <cat>", "b", "c"])}, 5)
    writer.write({"images/samples": (batch, ["d", "e", "f"])}, 10)
    page = (tmp_path / "images" / "index.html").read_text()
    assert page.index("step 10") < page.index("step 5") and "a &lt;cat&gt;" in page
    assert (tmp_path / "images" / "step_0000005" / "samples.png").stat().st_size > 0


def test_untested_library_versions_are_named_at_start(monkeypatch):
    from infd import versions

    assert versions.untested_versions() == []  # this environment is the tested one
    monkeypatch.setitem(versions.TESTED, "deepspeed", ">=0.1,<0.2")
    (message,) = versions.untested_versions()
    assert message.startswith("deepspeed 0.") and "outside the tested range >=0.1,<0.2" in message
