"""The checks of tests/python: each prints ok or FAIL with what it checked; the failures are
counted for the exit status."""
import moe_cpp

FAILURES = []


def check(cond, what, detail=""):
    print(("ok   " if cond else "FAIL ") + what + (f" ({detail})" if detail else ""), flush=True)
    if not cond:
        FAILURES.append(what)


def raises(fn, text, what):
    """fn() must raise moe_cpp.Error whose message contains text."""
    try:
        fn()
        check(False, what, "no error")
    except moe_cpp.Error as e:
        check(text in str(e), what, str(e))


def status():
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0
