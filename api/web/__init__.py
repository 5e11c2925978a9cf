"""The HTTP doors: the JSON API (routes.py) and the results page (pages.py), one FastAPI app (app.py) over the same
api/ functions as the CLI. Tokens authenticate both (auth.py): a bearer header for the API, a cookie for pages."""
