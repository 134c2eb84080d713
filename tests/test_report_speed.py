"""The Report's speed figures: each row's ratio to the teacher is taken against the teacher's speed
in the same pairing, round by round; its spread is recorded, and a spread wider than the margin
marks the ratio as unsteady, in the manifest's figures and in report.md."""
import json
import statistics

import pytest

from pipeline.report import (SPEEDS, SPREAD_MARGIN, UNSTEADY_MARK, alone_figures, paired_figures, per_second,
                             write_markdown)


def ratio_definition(rates, teacher_rates):
    """The definition: the median over rounds of (row tok/s in round i) / (teacher tok/s in round i)."""
    return statistics.median(r / t for r, t in zip(rates, teacher_rates))


def test_the_ratio_is_the_median_of_the_per_round_ratios_against_the_same_pairing():
    rates = [1180.0, 900.0, 1010.0, 1300.0, 950.0]
    teacher_rates = [942.0, 610.0, 700.0, 1010.0, 700.0]  # a busy machine: both slow in the same rounds
    figures = paired_figures(rates, teacher_rates)
    per_round = [r / t for r, t in zip(rates, teacher_rates)]
    assert figures["speed_ratio"] == round(ratio_definition(rates, teacher_rates), 3)
    assert figures["speed_ratio"] != round(statistics.median(rates) / statistics.median(teacher_rates), 3)
    assert figures["tokens_per_s"] == round(statistics.median(rates), 1)
    assert figures["teacher_tokens_per_s"] == round(statistics.median(teacher_rates), 1)
    assert figures["ratio_range"] == [round(min(per_round), 3), round(max(per_round), 3)]
    json.dumps(figures, allow_nan=False)  # a valid manifest entry


def test_the_unsteady_flag_flips_exactly_past_the_margin():
    """Unsteady: (max - min) / median of the per-round ratios above the margin, not at it."""
    teacher_rates = [100.0, 100.0, 100.0]  # ratios then equal the row's rates / 100: exact in binary
    at_margin = [100.0, 100.0, 100.0 * (1 + SPREAD_MARGIN)]
    assert (max(at_margin) - min(at_margin)) / 100.0 / ratio_definition(at_margin, teacher_rates) == SPREAD_MARGIN
    assert paired_figures(at_margin, teacher_rates)["unsteady"] is False
    past = [100.0, 100.0, 100.0 * (1 + SPREAD_MARGIN) + 1e-6]
    assert paired_figures(past, teacher_rates)["unsteady"] is True
    assert paired_figures(past, teacher_rates, margin=0.3)["unsteady"] is False


def test_the_same_row_speeds_against_two_teachers_pairings():
    """A row as fast as the teacher in every round reads 1x with no spread however the machine varied,
    where the ratio of medians from different pairings would not."""
    rates = [500.0, 1000.0, 1500.0]
    figures = paired_figures(rates, rates)
    assert figures["speed_ratio"] == 1.0 and figures["ratio_range"] == [1.0, 1.0] and not figures["unsteady"]


def test_the_teacher_alone_reads_one_with_its_own_spread():
    rates = [90.0, 100.0, 130.0, 95.0]
    median = statistics.median(rates)
    figures = alone_figures(rates)
    assert figures["speed_ratio"] == 1.0 and figures["tokens_per_s"] == figures["teacher_tokens_per_s"] == median
    assert figures["ratio_range"] == [round(90 / median, 3), round(130 / median, 3)]
    assert figures["unsteady"] is ((130 - 90) / median > SPREAD_MARGIN)


@pytest.mark.parametrize("bad", [[100.0, 0.0, 100.0], [100.0, float("inf"), 100.0], [100.0, float("nan"), 100.0], []])
def test_no_inf_or_nan_reaches_a_manifest(bad):
    with pytest.raises(ValueError, match="positive and finite"):
        paired_figures([100.0] * len(bad), bad)
    with pytest.raises(ValueError, match="positive and finite"):
        paired_figures(bad, [100.0] * len(bad))
    with pytest.raises(ValueError, match="rounds must pair"):
        paired_figures([100.0, 100.0], [100.0])
    for seconds in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive, finite time"):
            per_second(16, seconds)


def row(name, rate, teacher_rate, ratio, low, high, unsteady):
    speed = {}
    for k in SPEEDS:
        speed.update({f"{k}_tokens_per_s": rate, f"{k}_teacher_tokens_per_s": teacher_rate, f"{k}_speed_ratio": ratio,
                      f"{k}_ratio_range": [low, high], f"{k}_unsteady": unsteady})
    return {"name": name, "perplexity": 40.0, "control_ratio": 1.0, "perplexity_ratio": 1.0, "kl": 0.0,
            "top1_agreement": 1.0, "greedy_agreement": 32.0, "bytes": 2**20, "size_ratio": 1.0, "what": name, **speed}


def test_the_table_shows_the_same_pairing_teacher_and_marks_only_unsteady_ratios(tmp_path):
    rows = [row("teacher", 1000.0, 1000.0, 1.0, 0.98, 1.03, False),
            row("steady", 1420.0, 1000.0, 1.42, 1.38, 1.47, False),
            row("noisy", 1180.0, 942.0, 1.25, 0.61, 1.9, True)]
    metrics = {"rows": rows, "eval_tokens": 64, "seq_len": 32, "rounds": 5, "threads": 2, "control": "steady"}
    write_markdown(metrics, tmp_path, "t")
    lines = (tmp_path / "report.md").read_text().splitlines()
    table = {line.split(" | ")[0]: line for line in lines if line.startswith("| ") and " MiB " in line}
    speeds = " | ".join(["1420 | 1000 | 1.42x (1.38-1.47)"] * len(SPEEDS))
    assert table["| steady"] == f"| steady | 1.00 MiB | 1.000x | {speeds} |"
    noisy = " | ".join([f"1180 | 942 | 1.25x (0.61-1.90){UNSTEADY_MARK}"] * len(SPEEDS))
    assert table["| noisy"] == f"| noisy | 1.00 MiB | 1.000x | {noisy} |"
    assert UNSTEADY_MARK not in table["| teacher"] + table["| steady"]
    header = next(line for line in lines if line.startswith("| model | file size"))
    assert header.count("teacher tok/s") == len(SPEEDS) and header.count("|") == 4 + 3 * len(SPEEDS)
    note = next(line for line in lines if line.startswith(UNSTEADY_MARK))
    assert f"{SPREAD_MARGIN:.0%}" in note and "median" in note


def test_measure_rows_takes_each_rows_teacher_figures_from_its_own_pairing(monkeypatch):
    """With the timing faked: the teacher reads 100 tok/s alone, 50 beside v1 and 200 beside v2 (a
    machine whose load changed); each row's figures pair it with the teacher of its own pairing."""
    import pipeline.evaluate
    import pipeline.report as report

    teacher, models = object(), {"v1": object(), "v2": object()}
    teacher_alone, beside = [90.0, 100.0, 110.0], {"v1": [50.0, 50.0, 50.0], "v2": [200.0, 190.0, 210.0]}
    rates = {"v1": [60.0, 55.0, 65.0], "v2": [240.0, 228.0, 252.0]}

    def fake_rounds(pair, vocab, rounds):
        assert pair["teacher"] is teacher and len(pair) <= 2
        name = next((n for n in pair if n != "teacher"), None)
        per = {"teacher": {k: beside[name] if name else teacher_alone for k in SPEEDS}}
        return per | ({name: {k: rates[name] for k in SPEEDS}} if name else {})

    monkeypatch.setattr(report, "serving_rounds", fake_rounds)
    monkeypatch.setattr(pipeline.evaluate, "load_job_model", lambda spec: models[spec])
    rows = [("teacher", None, 1, ""), ("v1", "v1", 1, ""), ("v2", "v2", 1, "")]
    results = report.measure_rows(teacher, rows, {r[0]: {"perplexity": 2.0} for r in rows}, 512, rounds=3)
    for r in results:
        for k in SPEEDS:
            figures = {key: r[f"{k}_{key}"] for key in
                       ("tokens_per_s", "teacher_tokens_per_s", "speed_ratio", "ratio_range", "unsteady")}
            expected = alone_figures(teacher_alone) if r["name"] == "teacher" else \
                paired_figures(rates[r["name"]], beside[r["name"]])
            assert figures == expected, (r["name"], k)
    assert [r["decode_teacher_tokens_per_s"] for r in results] == [100.0, 50.0, 200.0]
    assert [r["decode_speed_ratio"] for r in results] == [1.0, 1.2, 1.2]
    json.dumps(results, allow_nan=False)
