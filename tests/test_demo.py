"""`make demo` runs on a machine with nothing configured and ends with the recipe's table."""
import re
import subprocess
import sys
from pathlib import Path

from receiver.demo import start_process

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_ends_with_every_answered_message_in_the_table(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}   # nothing configured

    run = subprocess.run([sys.executable, "-m", "receiver.demo"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "messageId" in run.stdout and "chatId" in run.stdout
    checked = re.search(r"all (\d+) delivered and answered messages are in the table with the right chatId "
                        r"and result", run.stdout)
    assert checked and int(checked.group(1)) > 0, run.stdout[-3000:]


def test_the_demo_s_processes_run_in_its_folder_with_this_checkout_s_code(tmp_path):
    # Run from the checkout, a process would read the developer's .env there on top of the demo's settings.
    code = "import os, receiver; print(os.getcwd()); print(receiver.__file__)"
    child = start_process(["python", "-c", code], {"PATH": "/usr/bin:/bin"}, tmp_path / "child.log")
    assert child.wait(30) == 0
    cwd, module = (tmp_path / "child.log").read_text().split()
    assert Path(cwd) == tmp_path
    assert Path(module) == ROOT / "receiver" / "__init__.py"
