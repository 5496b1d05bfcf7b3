"""The bench client's switch downtime (``bench/migration/run.py``: ``switch_edges``): the
first answer from the target minus the source's last answer before it, and no figure
where there is no switch to measure (the negative downtimes a failed-back run printed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_RUN = Path(__file__).resolve().parents[3] / "bench" / "migration" / "run.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("switch2_bench_run", _RUN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _bench()
S, T = "169.254.70.2", "169.254.71.2"


def test_switch2_gap_is_first_target_minus_last_source_before_it() -> None:
    answers = [(1.0, S), (1.001, S), (1.2, T), (1.3, T)]
    assert bench.switch_edges(answers, S, T) == (1.001, 1.2)


def test_switch2_failed_back_migration_has_no_downtime() -> None:
    # the domain stayed at (or came back to) its source address: the old formula,
    # first_ok[dst] - last_ok[src] of one address, gave minus the whole run
    answers = [(1.0, S), (4.0, S), (11.0, S)]
    assert bench.switch_edges(answers, S, S) == (None, None)
    p = bench.Prober.__new__(bench.Prober)
    p.answers = answers
    assert p.downtime(S, S) is None


def test_switch2_source_answers_after_the_target_do_not_count() -> None:
    # a source answering again later (a fail back after a switch) is not the switch
    answers = [(1.0, S), (1.5, T), (9.0, S)]
    assert bench.switch_edges(answers, S, T) == (1.0, 1.5)
    p = bench.Prober.__new__(bench.Prober)
    p.answers = answers
    assert p.downtime(S, T) == 0.5


def test_switch2_no_answer_from_a_side_has_no_downtime() -> None:
    assert bench.switch_edges([(1.0, S)], S, T) == (None, None)
    assert bench.switch_edges([(1.0, T)], S, T) == (None, 1.0)
    p = bench.Prober.__new__(bench.Prober)
    p.answers = [(1.0, T)]
    assert p.downtime(S, T) is None
    assert bench.switch_edges([], S, "") == (None, None)
