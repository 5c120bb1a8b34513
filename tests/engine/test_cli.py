"""`int8-convrot convert|inspect`: exit codes, one-line errors, JSON output, the installed command."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from comfyui_int8_convrot.cli import main
from convert_helpers import leftovers, write, zimage_sd


@pytest.fixture
def zfile(tmp_path):
    return write(tmp_path / "z.safetensors", zimage_sd())


def test_convert_and_inspect(zfile, tmp_path, capsys):
    out = tmp_path / "z_int8.safetensors"
    assert main(["convert", str(zfile), str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "preset zimage (detected" in text and "30 quantized" in text and "relative weight error" in text
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "INT8 ConvRot" in report and "group sizes: 64 (30)" in report
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "int8_convrot" and info["layers"]["int8_convrot"] == 30


def test_convert_json_and_options(zfile, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc = main(["convert", str(zfile), str(out), "--json", "--preset", "zimage", "--group-size", "16",
               "--scaling", "tensor", "--device", "cpu", "--exclude", r"layers\.1\.", "--include", "x_embedder"])
    captured = capsys.readouterr()
    assert rc == 0 and "waxy" in captured.err
    s = json.loads(captured.out)
    assert s["group_size"] == 16 and s["scaling"] == "tensor" and s["quantized"] == 30 - 5 + 1


@pytest.mark.parametrize("args, message", [
    (["--group-size", "32"], "power of 2 but not of 4"),
    (["--include", "("], "invalid --include regex"),
    (["--device", "cuda:7"], "cuda"),
])
def test_bad_options_exit_2_with_one_line(zfile, tmp_path, capsys, args, message):
    if "cuda:7" in args:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device exists")
    rc = main(["convert", str(zfile), str(tmp_path / "o.safetensors"), "-q", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("int8-convrot: error:") and err.count("\n") == 1
    assert not leftovers(tmp_path)


def test_bad_input_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    assert main(["convert", str(bad), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "not a safetensors file" in err
    assert main(["inspect", str(bad)]) == 2
    assert main(["convert", str(bad), str(bad), "--overwrite"]) == 2   # output == input: refused before reading
    assert "the output file is the input file" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "only_one_arg.safetensors"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["convert", "a", "b", "--scaling", "block"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_installed_command_and_module(zfile, tmp_path):
    """The console script (which ends the process with os._exit) and `python -m`."""
    exe = shutil.which("int8-convrot", path=os.path.dirname(sys.executable))
    assert exe, "the console script int8-convrot is not installed in this environment"
    out = tmp_path / "o.safetensors"
    r = subprocess.run([exe, "convert", str(zfile), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.exists() and "30 quantized" in r.stdout and "converting" in r.stderr
    r = subprocess.run([sys.executable, "-m", "comfyui_int8_convrot", "inspect", str(tmp_path / "missing.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().endswith("(check the path or the models folder)")
    assert r.stderr.count("\n") == 1
