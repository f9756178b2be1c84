"""Certify black-box vision APIs (AWS Rekognition, Google Cloud Vision, Azure AI Vision, Clarifai).

- ``base``        the base classifier's queries: clip, denoise, clamp, 8-bit PNG; identity-seeded noise
- ``labels``      top label of an answer; CERTIFY over the labels of an image's queries (no torch)
- ``images``      a job's images and the denoiser in front of the API, loaded and checked
- ``providers``   one client per provider on its official SDK; credentials from the SDK's configuration only
- ``ratelimit``   token bucket, concurrency cap, retries with backoff and jitter, vendor default limits
- ``answers``     answer each encoded image once (database cache, in-flight de-duplication)
- ``emulators``   local servers speaking each provider's wire protocol, labels from a real local classifier
- ``recertify``   offline re-certification of a job from its stored answers (no torch, no query)
- ``errors``      the named errors of all of the above

The job kind (spec, checks, cost estimate) is ``dsq.kinds.certify_api``. The Ray side (one actor per provider,
the job's runner) calls into these modules; none of them imports Ray.
Importing this package imports no SDK: each is imported where a client or emulator is made.
"""
