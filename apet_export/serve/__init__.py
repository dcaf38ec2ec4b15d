"""`apet-export serve`: an OpenAI-compatible chat-completions server for a build, on Ray Serve.

    protocol.py  the OpenAI request/response shapes: parsing a request body, chunks, errors
    media.py     data: URLs -> images / video frames, checked by the loaders `run` uses
    app.py       the Ray Serve deployment: HTTP routes, auth, body limit, batched vision encodes, streaming
    launcher.py  start (or join) a Ray cluster, deploy, wait until healthy, shut down on SIGTERM / SIGINT
    client.py    a small standard-library client (the load test and the tests use it)
"""
