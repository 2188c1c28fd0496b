import subprocess
import sys

from xrayforge import cli


def test_help_lists_commands(capsys):
    try:
        cli.main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "usage: xrayforge" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: xrayforge" in capsys.readouterr().out


def test_info_reports_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "pixel_norm" in out and "auto -> torch" in out


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "xrayforge", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("xrayforge ")


def test_a_group_without_its_action_prints_its_own_help(capsys):
    for argv, usage in ((["classify"], "usage: xrayforge classify "), (["evaluate"], "usage: xrayforge evaluate "),
                        (["evaluate", "reader-study"], "usage: xrayforge evaluate reader-study ")):
        assert cli.main(argv) == 2
        assert capsys.readouterr().out.startswith(usage)


def test_python_dash_m_cli_entry_point():
    res = subprocess.run([sys.executable, "-m", "xrayforge.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("xrayforge ")


def test_train_help_says_what_a_resumed_run_takes_from_the_command_line(capsys):
    try:
        cli.main(["train", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "from the command line it takes only ARCHIVE, --max-kimg, --total-kimg, --device" in out
    assert "any other option given must equal the run's, or it is refused" in out and "--include-test" in out


def test_train_lr_that_is_empty_or_beyond_1_is_refused_when_the_command_line_is_read(tmp_path, capsys):
    # ',' or '' silently trained at the default 0.001; 1e39 passed the check and failed minutes later as
    # "an unexpected error" (float32 overflow in Adam); 5 trained (diverging) where classify refuses it
    for lr in (",", "", "1e-3,", "1e39", "5"):
        try:
            cli.main(["train", str(tmp_path / "arc"), "--out", str(tmp_path / "run"), "--lr", lr])
        except SystemExit as exc:
            assert exc.code == 2, lr
        else:
            raise AssertionError(f"--lr {lr!r} was accepted")
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "argument --lr" in err[0], err
    from xrayforge.cli.train import _parse_lr
    assert _parse_lr("0.002,16:0.003") == (0.002, {16: 0.003}) and _parse_lr("1") == (1.0, {})
    try:
        _parse_lr("1024:7")
    except Exception as exc:  # noqa: BLE001
        assert "at most 1" in str(exc)
    else:
        raise AssertionError("1024:7 was accepted")


def test_out_of_cpu_memory_says_the_size_asked_whichever_library_ran_out():
    """numpy's MemoryError names its size with a unit ('8.00 PiB'): the message dropped it."""
    import numpy as np
    try:
        np.empty((2 ** 20, 2 ** 30))  # 8 PiB: refused on any machine, overcommit or not
    except MemoryError as exc:
        numpy_oom = exc
    torch_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                             "memory: you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")
    assert cli.describe(numpy_oom).startswith("out of memory (8.00 PiB asked at once); lower --batch")
    assert cli.describe(torch_oom).startswith("out of memory (4.0 GiB asked at once); lower --batch")
    assert cli.describe(MemoryError()).startswith("out of memory; lower --batch")


def test_out_of_cpu_memory_says_a_small_size_asked_in_its_own_unit():
    """A small request refused when memory is all but gone read "0.0 GiB asked at once"."""
    def torch_oom(n):
        return RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                            f"you tried to allocate {n} bytes. Error code 12 (Cannot allocate memory)")
    for n, said in ((1048576, "1.0 MiB"), (3000, "2.9 KiB"), (512, "512 bytes"), (4294967296, "4.0 GiB"),
                    (2 ** 53, "8.0 PiB")):
        assert cli.describe(torch_oom(n)).startswith(f"out of memory ({said} asked at once); lower --batch")
    numpy_small = MemoryError("Unable to allocate 100 bytes for an array with shape (100,) and data type uint8")
    assert cli.describe(numpy_small).startswith("out of memory (100 bytes asked at once)")
