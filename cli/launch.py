"""`molt extract --devices 0,1`: the same command under `torchrun --standalone`, one rank per entry.

Only builds the command line and runs it; the ranks themselves are ordinary `molt extract` runs
(molt_cache/extract.py splits the work units by RANK / WORLD_SIZE)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any


def parse_devices(devices: str) -> tuple[int, str, dict[str, str]]:
    """(ranks, the --device each rank gets, environment additions) for a `--devices` list.

    "0,1"   distinct GPUs: CUDA_VISIBLE_DEVICES=0,1 and --device cuda, so rank r runs on cuda:r
            (extract maps cuda to cuda:LOCAL_RANK)
    "0,0"   ranks sharing one GPU: --device cuda:0 for every rank
    "cpu,cpu"  ranks on the CPU (--device cpu)
    """
    entries = [d.strip() for d in devices.split(",") if d.strip()]
    if not entries:
        raise ValueError(f"--devices {devices!r}: give a comma-separated list, e.g. 0,1 (GPUs) or cpu,cpu")
    if all(d == "cpu" for d in entries):
        return len(entries), "cpu", {}
    if not all(d.isdigit() for d in entries):
        raise ValueError(f"--devices {devices!r}: every entry must be a GPU index (0,1) or every entry 'cpu'")
    if len(set(entries)) == 1:
        return len(entries), f"cuda:{entries[0]}", {}
    if len(set(entries)) != len(entries):
        raise ValueError(f"--devices {devices!r}: repeat a GPU only when every rank shares it (e.g. 0,0); "
                         "mixed lists such as 0,0,1 are not supported")
    return len(entries), "cuda", {"CUDA_VISIBLE_DEVICES": ",".join(entries)}


def option_args(options: dict[str, Any]) -> list[str]:
    """`--name value` for each option as typer spells it: underscores become dashes, a list is
    repeated, a bool is --name / --no-name, None is left out (the rank takes the default)."""
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            for v in value:
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    return args


def torchrun_command(devices: str, command: str, options: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """argv and environment additions of `torchrun --standalone --nproc_per_node N -m cli.main
    <command> <options> --device D`. `options` must not hold `device` or `devices`."""
    if "device" in options or "devices" in options:
        raise ValueError("pass --devices alone: each rank's --device follows from it")
    n, device, env = parse_devices(devices)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "cli.main", command, *option_args(options), "--device", device]
    return argv, env


def run_ranks(devices: str, command: str, options: dict[str, Any]) -> int:
    """Run the command under torchrun in the foreground; its exit code (the ranks print their own output)."""
    argv, env = torchrun_command(devices, command, options)
    print("launching: " + " ".join(argv[1:]) + "".join(f" ({k}={v})" for k, v in env.items()), flush=True)
    return subprocess.run(argv, env={**os.environ, **env}).returncode
