"""Help texts more than one command shows."""

MODEL_HELP = ("model package folder (local or s3://), or a registry reference REGISTRY/NAME@champion or "
              "REGISTRY/NAME@VERSION (resolved once; the run records the version)")
EPILOG = "Storage: local paths, file:// and s3:// URIs. S3 settings come from the standard AWS environment " \
    "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)."
