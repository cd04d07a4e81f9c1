"""The bundled load generator (``lbtcp bench``) and the echo/sink backends (``lbtcp echo``,
``lbtcp sink``).

Modules: ``histogram`` (mergeable log-bucketed histogram, pure), ``sizes`` (byte sizes, pure),
``report`` (tallies and the report, pure), ``servers`` (echo and sink protocols),
``loadgen`` (the client protocols and the run), ``commands`` (the click commands).
"""
