"""Certify black-box vision APIs (AWS Rekognition, Google Cloud Vision, Azure AI Vision, Clarifai).

- ``spec``        ``ApiCertifySpec``, the certify-api job spec
- ``base``        the base classifier: clip, denoise, clamp, 8-bit PNG, query, top label; identity-seeded noise
- ``providers``   one client per provider on its official SDK; credentials from the SDK's configuration only
- ``ratelimit``   token bucket, concurrency cap, retries with backoff and jitter, vendor default limits
- ``answers``     answer each encoded image once (database cache, in-flight de-duplication)
- ``emulators``   local servers speaking each provider's wire protocol, labels from a real local classifier
- ``jobs``        checks, cost estimates, results, offline re-certification from stored answers
- ``errors``      the named errors of all of the above

Ray lives in ``workers/api_actor.py`` (one actor per provider) and ``workers/api_runner.py`` (the job).
Importing this package imports no SDK: each is imported where a client or emulator is made.
"""
