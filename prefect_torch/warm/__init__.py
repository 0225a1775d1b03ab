"""A warm process for the ``prefect-torch`` command.

Every ``prefect-torch`` command used to pay 4-5 s of imports (torch, pandas,
pyarrow, Prefect's engine, our cards) before touching data: more than a fully
cached rerun's whole flow run. After a command, ``prefect-torch`` leaves a
*warm process* behind that has made those imports and waits, idle, on a Unix
socket. The next command connects to it, hands over its standard input, output
and error (the file descriptors themselves), its working directory, its
environment and its arguments, and the warm process forks a child that *is*
that command: same descriptors, same folder, same environment, Prefect's
settings and logging read again from them. The command's exit status and
signals pass back and forth, so to a shell or a script it is the same command.

- ``place``: which warm process fits a command (a key over the interpreter, the
  installed code and the environment) and where its socket lives.
- ``client``: the thin side the ``prefect-torch`` command runs; stdlib only.
- ``server``: the warm process: the imports, then a loop that forks one child
  per command.
- ``child``: what a forked child does to become the client's command.

Fork-after-import is safe here because the warm process only imports: it
runs no flow, starts no Python thread, initialises no CUDA and no torch
thread pool, so each child starts as a fresh process would after the same
imports. ``PREFECT_TORCH_WARM=0`` turns the warm process off; it exits by
itself after ``PREFECT_TORCH_WARM_IDLE_SECONDS`` (900) without a command, when
the installed code changes, or when its ``PREFECT_HOME`` is removed.
"""
