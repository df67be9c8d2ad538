"""Run outputs (prdp_ds/metrics.py): a resumed run's JSONL rows."""

import json

from prdp_ds.metrics import RunLog


def test_a_resume_drops_the_rows_it_redoes_and_a_line_torn_by_a_kill(tmp_path):
    rows = [json.dumps({"epoch": e, "reward_mean": 0.5}) for e in range(3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"epoch": 3, "rew')  # killed mid-write
    log = RunLog(tmp_path, enabled=True)
    log.log({"epoch": 2, "reward_mean": 0.7}, resumed_from=2)
    log.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == [{"epoch": 0, "reward_mean": 0.5}, {"epoch": 1, "reward_mean": 0.5}, {"epoch": 2, "reward_mean": 0.7}]
