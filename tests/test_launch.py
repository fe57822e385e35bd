"""launch.py: the autocast dtype each device gets, and the one-line exit for user errors while
every other exception keeps its traceback."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import launch  # noqa: E402
from launch import UserError  # noqa: E402

CPU, CUDA = torch.device('cpu'), torch.device('cuda', 0)


@pytest.mark.parametrize('native', [True, False])
def test_default_dtype_follows_the_hardware(monkeypatch, native):
    monkeypatch.setattr(launch, 'cpu_has_native_bf16', lambda: native)
    assert launch.amp_dtype(None, CPU) == (torch.bfloat16 if native else None)
    assert launch.amp_dtype(None, CUDA) == torch.bfloat16      # every GPU: bf16
    # a dtype given is taken as given, on either CPU
    assert launch.amp_dtype('fp32', CPU) is None and launch.amp_dtype('bf16', CPU) == torch.bfloat16
    assert launch.amp_dtype('fp16', CUDA) == torch.float16
    with pytest.raises(UserError, match='fp16 needs a CUDA GPU'):
        launch.amp_dtype('fp16', CPU)


@pytest.mark.parametrize('caps, native', [({'avx512_bf16': True}, True),
                                          ({'amx_bf16': True, 'avx512_bf16': False}, True),
                                          ({'avx2': True, 'avx512_bf16': False}, False),
                                          ({}, False)])
def test_native_bf16_is_what_torch_reports(monkeypatch, caps, native):
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: caps, raising=False)
    assert launch.cpu_has_native_bf16() is native


def test_dtype_names_round_trip():
    for name, dtype in launch.DTYPES.items():
        assert launch.dtype_name(dtype) == name


def test_error_line_is_the_last_line_said_once(monkeypatch):
    # as a loader worker delivers it: the worker's traceback, then the error's own line
    worker = data.UnreadableImage('Caught UnreadableImage in DataLoader worker process 0.\n'
                                  'Traceback (most recent call last):\n  File "x.py", line 1\n'
                                  'data.UnreadableImage: cannot read image a/b.png: truncated\n')
    plain = UserError('--batch-size 3 must be a multiple of 2 processes')
    monkeypatch.delenv('RANK', raising=False)
    assert launch.error_line(worker) == 'error: cannot read image a/b.png: truncated'
    assert launch.error_line(plain) == 'error: --batch-size 3 must be a multiple of 2 processes'
    monkeypatch.setenv('RANK', '1')                     # not rank 0: only its own bad image
    assert launch.error_line(plain) is None
    assert launch.error_line(worker) == 'error: cannot read image a/b.png: truncated'


def test_user_error_is_one_line_and_exit_1(capsys, monkeypatch):
    monkeypatch.delenv('RANK', raising=False)

    def bad():
        raise UserError('no folder x')
    with pytest.raises(SystemExit) as e:
        launch.exit_on_user_error(bad)
    assert e.value.code == 1 and capsys.readouterr().err == 'error: no folder x\n'
    assert launch.exit_on_user_error(lambda: 7) == 7


def test_a_torch_value_error_keeps_its_traceback():
    """BatchNorm's own ValueError (a batch of 1 in training) is a bug to debug, not bad input:
    the entry point must not turn it into one line."""
    code = ('import sys, torch, launch\n'
            'bn = torch.nn.BatchNorm1d(4)\n'
            'launch.exit_on_user_error(lambda: bn(torch.zeros(1, 4)))\n')
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert 'Traceback (most recent call last)' in r.stderr
    assert 'Expected more than 1 value per channel' in r.stderr
    assert not r.stderr.startswith('error:')


def test_single_process_run_without_torchrun(monkeypatch):
    monkeypatch.delenv('RANK', raising=False)
    run = launch.setup()
    assert (run.rank, run.world_size, run.is_main) == (0, 1, True)
    assert run.device.type == ('cuda' if torch.cuda.is_available() else 'cpu')
