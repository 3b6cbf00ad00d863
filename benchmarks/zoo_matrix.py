"""The model zoo's matrix: architecture x attention kernel x invariant, pass or fail.

Runs every test of ``tests/test_zoo.py`` (the default slice and ``-m zoo``) and prints one row
per (architecture, kernel) with a column per invariant, then the run time.

    python benchmarks/zoo_matrix.py        # about 5.5 minutes on 2 CPU cores (326 s, 2026-11-22)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

COLUMNS = {  # test function -> column title
    "test_packed_equals_padded_for_sft_dpo_and_grpo": "packed = padded",
    "test_left_padded_prompts_score_as_alone": "left pad = alone (ratio 1, values)",
    "test_sampling_loop_matches_generate": "sampling = generate",
    "test_reward_read_at_last_real_token_and_reload": "reward at last token, reload",
    "test_lora_reference_equals_its_base": "LoRA ref = base",
    "test_one_step_of_every_recipe": "one step of every recipe",
}


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = os.path.join(tempfile.mkdtemp(), "zoo.xml")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "zoo or not zoo", "tests/test_zoo.py",
                    f"--junitxml={report}", "-p", "no:cacheprovider"], cwd=root, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        m = re.match(r"(test_\w+)\[(\w+)-(\w+)\]", case.get("name", ""))
        if not m or m.group(1) not in COLUMNS:
            continue
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        cells.setdefault((m.group(2), m.group(3)), {})[m.group(1)] = "FAIL" if failed else "skip" if skipped else "pass"
    print("| architecture | kernel | " + " | ".join(COLUMNS.values()) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for (arch, kernel), row in cells.items():
        print(f"| {arch} | {kernel} | " + " | ".join(row.get(t, "n/a") for t in COLUMNS) + " |")
    total = [v for row in cells.values() for v in row.values()]
    print(f"\n{total.count('pass')} passed, {total.count('FAIL')} failed, {total.count('skip')} skipped "
          f"in {seconds:.0f} s")


if __name__ == "__main__":
    main()
