"""Running a command with its stderr on a real terminal (a pseudo-terminal), as a user sees it:
status lines and progress bars are drawn only there."""
import os
import pty
import select
import subprocess
import threading
import time


def run_on_a_terminal(cmd, cwd=None, env=None, timeout=600) -> tuple[int, str, str]:
    """(exit code, stdout, what the terminal showed on stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown, deadline = b"", time.monotonic() + timeout
    out = []     # stdout read in a thread, so that a full pipe never stalls the command
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))
    reader.start()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:     # the other end closed
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    proc.wait()
    reader.join()
    os.close(master)
    return proc.returncode, out[0].decode(), shown.decode(errors="replace")
