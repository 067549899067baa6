"""The benchmark of issue 11: the bridge against libmilter C and pymilter, one policy, one load.

``python -m bench.run`` (docs/performance.md). One module per job:

- ``install``: gcc, libmilter-dev and Python's headers (apt, as root), pymilter (pip,
  into the running venv), and compiling the C milters.
- ``milters``: the four milter setups and how each is started.
- ``processes``: start pinned to a core, stop, CPU time and RSS from /proc.
- ``idle``: memory per idle MTA connection.
- ``load``: one run of ``milter-bridge load`` and the check of its every outcome.
- ``report``: the markdown table, the ratios and the JSON of raw results.
- ``profile``: py-spy on the bridge and the SDK policy under load, summarised.
- ``c_policy.c``, ``pymilter_policy.py``, ``sdk_policy.py``: the policy, three times.
"""
