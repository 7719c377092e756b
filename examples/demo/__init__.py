"""The whole system at work, in one command: ``python3 dev.py demo``.

The demo makes development certificates in a temporary directory, starts
the controller (with the gateway) and the nine example workers of
:mod:`examples.workers` as separate processes talking mutual TLS, invokes
every capability, kills the controller and watches it recover, stops one
worker and watches it leave, and prints a summary table. It exits 0 when
every check passed, 1 when one failed.

It lives beside the examples, not in a distribution, because it runs the
worker programs of this source tree. The modules, from the bottom up:

- :mod:`~examples.demo.processes`: child processes in their own process
  groups, and how they are all stopped;
- :mod:`~examples.demo.report`: the progress lines and the summary table;
- :mod:`~examples.demo.system`: the certificates, the controller and the
  workers, and an HTTPS client for the controller;
- :mod:`~examples.demo.calls`: one call per capability, with its check;
- :mod:`~examples.demo.steps`: the steps, in order;
- :mod:`~examples.demo.shared`: ``--shared``, two controllers on one Redis
  (one of them killed), with its own steps;
- :mod:`~examples.demo.command`: the command line (``python -m examples.demo``).
"""
