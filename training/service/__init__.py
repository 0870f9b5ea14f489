"""Training as a service: stored datasets, durable training records, Ray jobs, webhooks.

    datasets.py   archives in, validated, content-addressed in the registry's storage
    records.py    one durable record per training (compare-and-swap) and its job's event stream
    runner.py     the Ray Jobs API: submit (idempotent by training id), status, stop
    scheduler.py  queue -> Ray job -> finished: the state machine, reconciled with Ray's job table
    webhooks.py   signed, retried deliveries of state changes
    job.py        what runs inside the Ray job: fetch the dataset, train, report, publish

The HTTP routes (serve/trainings_api.py) and the CLI client (client.py) sit on top.
"""
