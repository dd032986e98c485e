"""Each benchmark's --smoke mode runs and writes valid JSON (the figures themselves are not
checked: they depend on the machine). One test, one Ray instance, everything in this process."""
from __future__ import annotations

import json
import math
import time

from benchmarks import scaling, search_efficiency, search_overhead, train_throughput


def _valid(path):
    payload = json.loads(path.read_text())  # strict JSON: NaN is written as null
    assert payload["smoke"] is True
    machine = payload["machine"]
    assert machine["cpu_cores"] >= 1 and machine["versions"]["torch"] and machine["date"]
    return payload


def test_smoke_modes_write_valid_json(tmp_path, ray_session):
    started = time.perf_counter()
    out = tmp_path / "results"

    assert train_throughput.main(["--smoke", "--out-dir", str(out)]) == 0
    tt = _valid(out / "train_throughput.smoke.json")
    from biometry.models import list_models

    assert [r["model"] for r in tt["cpu_preset"]["rows"]] == list_models()
    assert all(r["train_images_per_s_model_only"] > 0 for r in tt["cpu_preset"]["rows"])

    assert search_overhead.main(["--smoke", "--in-process", "--out-dir", str(out),
                                 "--work-dir", str(tmp_path / "overhead")]) == 0
    so = _valid(out / "search_overhead.smoke.json")
    assert math.isfinite(so["configs"][0]["variants"]["shipped"]["per_trial_overhead_s"])

    assert scaling.main(["--smoke", "--in-process", "--out-dir", str(out),
                         "--work-dir", str(tmp_path / "scaling")]) == 0
    sc = _valid(out / "scaling.smoke.json")
    assert sc["cpu"][0]["trials_per_hour_steady"] > 0
    assert sc["gpu"]["status"]

    assert search_efficiency.main(["--smoke", "--in-process", "--out-dir", str(out),
                                   "--work-dir", str(tmp_path / "efficiency")]) == 0
    se = _valid(out / "search_efficiency.smoke.json")
    assert {r["method"] for r in se["runs"]} == {"ours", "random", "tpe_median"}
    assert (out / "search_efficiency.smoke.png").stat().st_size > 0
    print(f"benchmark smoke modes took {time.perf_counter() - started:.1f}s")
