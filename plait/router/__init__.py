"""Data parallelism: ``plait router`` in front of several ``plait serve`` replicas (``app.py``), and
``plait serve --dp N``, which starts N replicas and the router (``launcher.py``)."""
