"""The GIL profile loads real blocks from a disk tier beside a probe thread and reports what
the probe lost per block loaded."""

import json

from kvgrid.bench.gpu.profile_gil import main


def test_the_gil_profile_loads_from_the_tier_and_measures_the_probe(tmp_path, capsys):
    out = tmp_path / "gil.json"
    rc = main(["--dir", str(tmp_path), "--blocks", "6", "--block-mb", "0.0625",
               "--workers", "2", "--fetch-procs", "0,1", "--seconds", "0.3",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    rows = [(r["workers"], r["fetch_procs"]) for r in res["results"]]
    assert rows == [(2, 0), (2, 1)]
    for r in res["results"]:
        assert r["blocks_below_g2"] == 6  # the loads read the tier, not G2
        assert (r["blocks_from_procs"] > 0) == (r["fetch_procs"] > 0)
        assert r["blocks_per_s"] > 0 and r["probe_alone_per_s"] > 0 and r["probe_busy_per_s"] > 0
        assert r["probe_ratio"] == r["probe_busy_per_s"] / r["probe_alone_per_s"]
    assert "probe us lost per block" in capsys.readouterr().out
    assert not list(tmp_path.glob("kvgrid-gil-*"))  # its folders are removed


def test_the_gil_profile_measures_the_write_down_too(tmp_path, capsys):
    out = tmp_path / "gil.json"
    rc = main(["--dir", str(tmp_path), "--blocks", "2", "--block-mb", "0.0625", "--writes",
               "--workers", "2", "--write-procs", "0,1", "--seconds", "0.3",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["workers"], r["write_procs"]) for r in rows] == [(2, 0), (2, 1)]
    for r in rows:
        assert r["blocks_per_s"] > 0 and r["fetch_procs"] == 0
        assert (r["blocks_from_procs"] > 0) == (r["write_procs"] > 0)
    assert "write-down to g3" in capsys.readouterr().out
