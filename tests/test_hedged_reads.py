"""Hedged sample reads (infd/data/hedged.py) against a real S3 server: a proxy holds the response of
one sample's GET until the test lets it go, and the loader's batches arrive meanwhile through the
second GET the hedge sent. No wall-clock threshold: the held response is released only after the
batches are in hand."""
import subprocess
import sys
import threading
from pathlib import Path

from infd.data.hedged import HEDGES, hedged
from infd.data.loader import build_loader
from tests.images import build, write_folder
from tests.s3_server import HoldingProxy
from tests.test_loader import data_cfg
from tests.test_s3 import s3  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_a_held_response_is_overtaken_by_its_hedge(tmp_path, s3, monkeypatch):  # noqa: F811
    write_folder(tmp_path / "src", [(64 + 5 * i, 60) for i in range(16)])
    build(tmp_path / "src", "s3://bucket/h", "--samples-per-shard", "4", "--min-side", "32", "--no-verify")
    proxy = HoldingProxy(s3.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        loader = build_loader(data_cfg("s3://bucket/h/", num_workers=2, hedge_after_s=0.2, request_timeout_s=600))
        batches = loader.epoch_batches()
        got = [next(batches), next(batches)]  # one from each worker
        assert proxy.held.is_set() and not proxy.released.is_set()  # a GET is still held as the batches arrive
        assert loader.hedges_fired() >= 1
        assert sum(len(b.keys) for b in got) == 8
        batches.close()
    finally:
        proxy.close()


def test_hedged_returns_the_second_answer_when_the_first_hangs_and_an_error_only_if_both_fail():
    gate, calls = threading.Event(), []

    def fetch():
        calls.append(len(calls))
        if len(calls) == 1:
            gate.wait()  # the first request hangs until the test ends
            return "first"
        return "second"

    before = dict(HEDGES)
    try:
        assert hedged(fetch, 0.05) == "second"
        assert HEDGES["fired"] == before["fired"] + 1 and HEDGES["won"] == before["won"] + 1
    finally:
        gate.set()

    def failing():
        raise ConnectionError("refused")

    try:
        hedged(failing, 0.05)
    except ConnectionError as err:
        assert "refused" in str(err)
    else:
        raise AssertionError("both requests failed, yet no error")


def test_a_process_exits_while_a_hedged_request_still_hangs():
    """The request threads are daemons: a straggler that never answers does not hold the process at exit
    (ThreadPoolExecutor joins its threads at exit: this child would never end)."""
    code = ("import threading\nfrom infd.data.hedged import hedged\nforever = threading.Event()\n"
            "calls = []\n"
            "def fetch():\n    calls.append(1)\n    if len(calls) == 1:\n        forever.wait()\n    return 'twin'\n"
            "print(hedged(fetch, 0.05))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "twin", res.stderr
