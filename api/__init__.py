"""The application: what every door (the CLI in manage.py, the HTTP API) calls. No torch here: jobs, sweeps,
validation, adapters, the report and its rendering, over worker/ and models/."""
