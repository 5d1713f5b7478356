"""Starts N copies of a JAX program on this machine as one distributed job.

Each copy is one process of JAX's distributed runtime: it finds the
coordinator at ``127.0.0.1:PORT`` (a free port chosen at run time), and on
the CPU it gets ``--local-devices`` forced devices and talks to the others
through JAX's CPU collectives (gloo) over the loopback address. This is how
a multi-host job (a TPU pod slice, a multi-GPU SLURM job) can be tried and
tested on one machine; on a real cluster the scheduler starts the
processes instead and ``jax.distributed.initialize()`` finds the rest.

Usage::

  python examples/multi_process/launch.py --processes 2 --local-devices 2 \\
      -- python examples/multi_process/train_cnn.py --steps 20

The program reads where it belongs from the environment (see
``train_cnn.py``'s ``initialize``):

* ``JAX_COORDINATOR_ADDRESS``: ``127.0.0.1:PORT`` (JAX reads it itself),
* ``FO_NUM_PROCESSES``, ``FO_PROCESS_ID``: the job's size and this rank.

The launcher never leaves a process behind and never waits forever: when a
process exits with an error, the others are stopped (SIGTERM, then SIGKILL)
and the launcher reports which process failed and how; when the job runs
past ``--timeout`` seconds, every process is stopped. Each process's output
goes to ``<log_dir>/process_<i>.log``; a failure prints its tail.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def initialize(**kwargs) -> None:
  """``jax.distributed.initialize`` for this launcher or for a cluster.

  Under this launcher (``FO_NUM_PROCESSES`` is set) the coordinator, the
  job's size and this process's rank come from the environment it sets;
  elsewhere (SLURM, a TPU pod slice, Open MPI, Kubernetes) JAX detects
  them itself, so the same program runs unchanged on both. ``kwargs`` go
  to ``jax.distributed.initialize`` (e.g. ``heartbeat_timeout_seconds``).
  Must run before anything else touches JAX's devices.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if 'FO_NUM_PROCESSES' in os.environ:
    kwargs.setdefault('coordinator_address',
                      os.environ['JAX_COORDINATOR_ADDRESS'])
    kwargs.setdefault('num_processes', int(os.environ['FO_NUM_PROCESSES']))
    kwargs.setdefault('process_id', int(os.environ['FO_PROCESS_ID']))
  jax.distributed.initialize(**kwargs)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class ProcessResult:
  """How one process of the job ended."""
  process_id: int
  returncode: int | None  # None: stopped by the launcher
  log: str  # path of its combined stdout and stderr

  def output(self) -> str:
    with open(self.log, errors='replace') as f:
      return f.read()


class JobFailed(RuntimeError):
  """A process of the job failed or the job ran past its time limit."""

  def __init__(self, message: str, results: list[ProcessResult]):
    super().__init__(message)
    self.results = results


def child_env(process_id: int, processes: int, port: int,
              local_devices: int | None,
              env: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of process ``process_id`` of the job."""
  out = dict(os.environ if env is None else env)
  out.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
             FO_NUM_PROCESSES=str(processes),
             FO_PROCESS_ID=str(process_id))
  if local_devices is not None:
    # Forced CPU devices; a GPU or TPU job has its own.
    flags = [f for f in out.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    flags.append(f'--xla_force_host_platform_device_count={local_devices}')
    out['XLA_FLAGS'] = ' '.join(flags)
    out['JAX_PLATFORMS'] = 'cpu'
  return out


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
  """SIGTERM to every live process group, SIGKILL after ``grace`` seconds."""
  live = [p for p in procs if p.poll() is None]
  for p in live:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + grace
  for p in live:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def _tail(result: ProcessResult, chars: int = 3000) -> str:
  text = result.output()
  return text[-chars:] if len(text) > chars else text


def launch(command: list[str], processes: int = 2,
           local_devices: int | None = 2, timeout: float = 600.0,
           log_dir: str | None = None, env: dict[str, str] | None = None,
           grace: float = 5.0, poll: float = 0.2,
           stop_on_failure: bool = True) -> list[ProcessResult]:
  """Runs ``command`` as ``processes`` processes of one JAX job.

  Args:
    command: the program and its arguments, the same for every process.
    processes: how many processes.
    local_devices: forced CPU devices per process; ``None`` leaves the
      platform and its devices alone (a machine with GPUs).
    timeout: seconds the whole job may run.
    log_dir: where the processes' logs go; default: a new temporary folder.
    env: the environment to start from; default: this process's.
    grace: seconds between SIGTERM and SIGKILL when stopping processes.
    poll: seconds between checks of the processes.
    stop_on_failure: stop the others as soon as one process fails; with
      False they run on until they end by themselves or the time limit
      (to see what JAX itself does when a peer dies).

  Returns:
    One :class:`ProcessResult` per process, all with return code 0.

  Raises:
    JobFailed: a process exited with an error (the others are stopped), or
      the job ran past ``timeout`` (all are stopped). The message names the
      process and shows the tail of its log.
  """
  if processes < 1:
    raise ValueError(f'processes must be >= 1, got {processes}')
  log_dir = log_dir or tempfile.mkdtemp(prefix='fo_launch_')
  port = free_port()
  procs, logs = [], []
  try:
    for i in range(processes):
      log = os.path.join(log_dir, f'process_{i}.log')
      logs.append(log)
      with open(log, 'w') as f:
        # A session of its own: stopping the process stops its children.
        procs.append(subprocess.Popen(
            command, env=child_env(i, processes, port, local_devices, env),
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True))
    deadline = time.monotonic() + timeout
    ended = []  # process ids in the order they were seen to end
    while True:
      codes = [p.poll() for p in procs]
      ended += [i for i, c in enumerate(codes)
                if c is not None and i not in ended]
      failed = [i for i in ended if codes[i] != 0]
      if (failed and stop_on_failure) or None not in codes:
        break
      if time.monotonic() > deadline:
        running = [i for i, c in enumerate(codes) if c is None]
        _stop(procs, grace)
        results = [ProcessResult(i, None if i in running else codes[i],
                                 logs[i]) for i in range(processes)]
        raise JobFailed(
            f'the job ran past its time limit of {timeout:.0f} s; stopped '
            f'process(es) {running} of {processes}. Tail of process '
            f'{running[0]}:\n' + _tail(results[running[0]]), results)
      time.sleep(poll)
  finally:
    # Also on KeyboardInterrupt or an error in this function.
    stopped = [p.poll() is None for p in procs]
    _stop(procs, grace)
  results = [ProcessResult(i, None if stopped[i] else p.returncode, logs[i])
             for i, p in enumerate(procs)]
  if failed:
    first = results[failed[0]]
    others = [r.process_id for r in results if r.returncode is None]
    raise JobFailed(
        f'process {first.process_id} of {processes} exited with code '
        f'{first.returncode}'
        + (f'; stopped process(es) {others}' if others else '')
        + f'. Tail of its log ({first.log}):\n' + _tail(first), results)
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      usage='%(prog)s [options] -- command [args...]')
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--local-devices', type=int, default=2,
                      help='forced CPU devices per process; 0: leave the '
                      'platform alone (GPUs)')
  parser.add_argument('--timeout', type=float, default=600.0)
  parser.add_argument('--log-dir', default=None)
  parser.add_argument('command', nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('no command to launch (put it after --)')
  try:
    results = launch(command, args.processes, args.local_devices or None,
                     args.timeout, args.log_dir)
  except JobFailed as e:
    print(f'launch: {e}', file=sys.stderr)
    return 1
  for r in results:
    print(f'--- process {r.process_id} ({r.log}) ---')
    print(r.output(), end='')
  return 0


if __name__ == '__main__':
  sys.exit(main())
