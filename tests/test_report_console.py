"""What a person sees: the start-of-run header, an indicator in every slow phase, no third-party noise;
on a terminal (a pseudo-terminal here) and in a log file."""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

from support import REPO, tiny_recipe, write_recipe

HEADER = ("model", "method", "strategy", "processes", "precision", "global batch", "steps", "output", "resume")
# What libraries print on their own and the launcher keeps out of the console.
NOISE = ("Setting accelerator to CPU", "FutureWarning", "is deprecated", "Loading weights", "Writing model shards",
         "it/s]", "Map:", "Traceback")
# Runs the launcher, then says on stderr whether deepspeed was imported (a LoRA run under DDP has no use for it).
RUN = ("import sys; from launcher.cli import main; status = main(sys.argv[1:]); "
       "print('deepspeed imported:', 'deepspeed' in sys.modules, file=sys.stderr); sys.exit(status)")


def short_run(tiny_model, tmp_path, **sections):
    settings = {"train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "gradient_checkpointing": True},
                "eval": {"samples": 1, "generate_rows": 4, "max_new_tokens": 4}, **sections}
    return write_recipe(tiny_recipe(tiny_model, tmp_path / "run", **settings), tmp_path / "recipe.yaml")


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "COLUMNS": "160"}


def run_in_pty(args: list[str], timeout: float = 900) -> str:
    """The launcher's output as a terminal receives it (escape codes and all)."""
    import pty
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-c", RUN, *args], stdin=follower, stdout=follower, stderr=follower,
                               env={**environment(), "TERM": "xterm-256color"}, cwd=REPO, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(leader)
    output = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, output[-3000:]
    return output


def test_a_terminal_shows_the_header_an_eval_progress_line_and_no_library_noise(tiny_model, tmp_path):
    output = run_in_pty([short_run(tiny_model, tmp_path)])
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output).replace("\r", "\n")  # each redraw of the live lines on a line
    for name in HEADER:
        assert re.search(rf"^{name}\s{{2,}}\S", plain, re.M), f"header line {name!r} missing:\n{plain[:2000]}"
    assert re.search(r"^processes\s+1 x cpu$", plain, re.M) and re.search(r"^resume\s+none \(fresh run\)$", plain, re.M)
    assert re.search(r"evaluation \(step 0\).*\d+/20 rows", plain), "no live row count during the first evaluation"
    assert "finished in" in plain and "tokens/s on average" in plain
    assert [noise for noise in NOISE if noise in plain] == []
    assert "deepspeed imported: False" in plain


def test_a_log_file_gets_plain_lines_one_per_phase_end_and_per_step(tiny_model, tmp_path):
    log = tmp_path / "run.log"
    with log.open("w") as handle:
        result = subprocess.run([sys.executable, "-c", RUN, short_run(tiny_model, tmp_path)], stdout=handle,
                                stderr=subprocess.PIPE, text=True, env=environment(), cwd=REPO, timeout=900)
    text = log.read_text()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\x1b[" not in text, "escape codes in a log file"
    assert re.search(r"^global batch\s+2 = 2 micro x 1 accum x 1 processes$", text, re.M)
    for phase in ("weights", "tokenisation", "loading model", "evaluation \\(step 0\\)", "evaluation \\(step 2\\)", "export"):
        assert re.search(rf"^{phase}: done.* in \d", text, re.M), f"no end line for phase {phase}"
    assert re.search(r"^evaluation \(step 0\): done \(20/20 rows\)", text, re.M)
    assert re.search(r"^step 1/2  loss \d+\.\d+  lr \S+  grad norm \S+  tok/s \S+  elapsed", text, re.M)
    assert [noise for noise in NOISE if noise in text + result.stderr] == []
    assert "deepspeed imported: False" in result.stderr
