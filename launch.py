"""How every entry point runs: one process or many (torchrun), a CUDA GPU or a CPU.

What train_pretrain.py, train_linear.py, train_finetune.py and bench.py do the same way, said once:
  * `setup()`: torchrun's env:// when RANK is set (NCCL on GPUs, gloo on CPUs), else one plain
    process -> a `Run`: rank, world size, device, `say` (prints on rank 0 only), `show_bar`
    (a tqdm bar on a terminal, plain lines in a log file);
  * `amp_dtype()`: the autocast dtype, bf16 wherever the hardware computes it natively;
  * `UserError` and `exit_on_user_error()`: bad input (a missing folder, a checkpoint of another
    arch) is one line on stderr and exit code 1; every other exception, torch's own ValueErrors
    included, keeps its traceback: it is a bug to debug.
"""
import dataclasses
import os
import sys

import torch
import torch.distributed as dist


class UserError(ValueError):
    """Bad input from the user, reported as one line without a traceback. Under torchrun rank 0
    speaks for all (every rank sees the same arguments and files), unless `every_rank`: an error
    only the process that met it knows of (an unreadable image read by its shard)."""
    every_rank = False


# ----------------------------------------------------------------------------- processes
@dataclasses.dataclass
class Run:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def show_bar(self):
        """A tqdm bar on rank 0 at a terminal; redirected to a file, plain lines instead."""
        return self.is_main and sys.stdout.isatty() and sys.stderr.isatty()

    def say(self, *args):
        if self.is_main:
            print(*args, flush=True)


def setup():
    """torchrun's env:// (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR set by torchrun) -> the process
    group and this process's device; without RANK one plain process and no process group.
    MOCO_DIST_BACKEND overrides the backend: gloo runs two ranks on one GPU (tools/gpu_check.sh),
    where NCCL refuses to."""
    cuda = torch.cuda.is_available()
    if 'RANK' not in os.environ:
        return Run(0, 1, 0, torch.device('cuda' if cuda else 'cpu'))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank % torch.cuda.device_count()) if cuda \
        else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = os.environ.get('MOCO_DIST_BACKEND') or ('nccl' if cuda else 'gloo')
        dist.init_process_group(backend)
    return Run(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier():
    """Wait for every process (nothing to wait for alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- numerics
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}


def cpu_has_native_bf16():
    """What torch reports of this CPU: bf16 arithmetic in hardware (x86 AVX512-BF16 or AMX-BF16,
    Arm's BF16 extension). Without it a bf16 matmul is emulated and runs far slower than fp32."""
    caps = getattr(torch.cpu, 'get_capabilities', lambda: {})()     # public from torch 2.10
    return any(caps.get(name) for name in ('avx512_bf16', 'amx_bf16', 'bf16', 'sve_bf16'))


def amp_dtype(name, device):
    """--dtype -> the autocast dtype (None: plain fp32). name None picks for the hardware: bf16 on
    CUDA and on CPUs with native bf16 (~4x the fp32 matmul rate on AVX512-BF16), fp32 on other
    CPUs. fp16 is CUDA's alone (its GradScaler is). Numerically delicate parts stay fp32 under
    autocast on either device (softmax, norms, the losses: moco.contrastive_loss)."""
    if name is None:
        name = 'bf16' if device.type == 'cuda' or cpu_has_native_bf16() else 'fp32'
    if name == 'fp16' and device.type != 'cuda':
        raise UserError('--dtype fp16 needs a CUDA GPU (its GradScaler); a CPU runs bf16 or fp32')
    return DTYPES[name]


def dtype_name(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


# ----------------------------------------------------------------------------- the exit
def error_line(e):
    """The one line a script prints for the user error e, or None where another process says it.
    Raised in a loader worker, the error reaches the main process with the worker's traceback in
    its message: its last line is what the user needs."""
    if int(os.environ.get('RANK', 0)) != 0 and not e.every_rank:
        return None
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return 'error: ' + last.split(f'{type(e).__name__}: ')[-1]


def exit_on_user_error(fn):
    """fn() -> its result; a UserError instead prints one line on stderr and exits with 1."""
    try:
        return fn()
    except UserError as e:
        line = error_line(e)
        if line:
            print(line, file=sys.stderr)
        sys.exit(1)
