"""The disk-lookup profile runs both modes on a real folder and reports each one's spread."""

import json

from kvgrid.bench.gpu.profile_disk_lookup import main


def test_the_lookup_profile_measures_the_owner_and_stat_lookups(tmp_path, capsys):
    out = tmp_path / "lookup.json"
    rc = main(["--dir", str(tmp_path), "--seconds", "0.3", "--object-mb", "0.05",
               "--writers", "1", "--spinners", "0", "--blocks", "8",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    for mode in ("stat", "owner"):
        r = res[mode]
        assert r["lookups"] > 5 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert "owner" in capsys.readouterr().out
    assert not list(tmp_path.glob("kvgrid-lookup-*"))  # its folders are removed
