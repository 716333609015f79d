"""stall_report.py over a small hand-made Nsight Compute source-page CSV (the real ones come from the GPU machine)."""

import csv

from benchmarks.kernels.profiling import stall_report


def _write(path, rows):
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_wait",
              "stall_long_sb", "stall_wait (Not Issued)"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "k", ""])
        w.writerow(header)
        for src, samples, executed, wait, long_sb in rows:
            w.writerow(["0x0", src, samples, executed, wait, long_sb, 0])


def test_report_shares_by_reason_opcode_and_instruction(tmp_path, capsys):
    path = tmp_path / "k_sass.csv"
    _write(path, [("      STS [R1], R2", 60, 10, 0, 60), ("      @P0 LOP3.LUT R3, R4", 30, 100, 30, 0),
                  ("      HMMA.16816.F32 R8, R4", 10, 50, 10, 0)])
    stall_report.report(str(path), top=3)
    out = capsys.readouterr().out
    assert "100 samples, 160 warp instructions executed" in out
    assert "stall_long_sb               60.0 %" in out
    assert "stall_wait                  40.0 %" in out
    # Predicates are stripped and opcodes grouped without their modifiers.
    assert "LOP3      30.0 %  executed         100  wait 30.0" in out
    lines = out.splitlines()
    hottest = lines[lines.index("hottest instructions:") + 1]
    assert "60.0 %" in hottest and "STS [R1], R2" in hottest
