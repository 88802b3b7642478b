"""Verifies a runner-monitor job attestation with in-toto's own Python tools, independently of
`runner-monitor attest verify`: in-toto loads the DSSE envelope, securesystemslib reads the
ed25519 public key (PEM) and checks the signature over DSSE's PAE. Prints the statement's
subject name; exits 1 (with the reason) when it does not verify.

Usage: python verify_attestation.py ATTESTATION PUBLIC_KEY_PEM
Run with the virtualenv `cargo xtask setup` makes: ~/.cache/runner-monitor/in-toto/bin/python
"""

import json
import sys

from cryptography.hazmat.primitives.serialization import load_pem_public_key
from in_toto.models.metadata import Envelope, Metadata
from securesystemslib.signer import SSlibKey


def main() -> int:
    attestation, public_key = sys.argv[1], sys.argv[2]
    with open(public_key, "rb") as f:
        key = SSlibKey.from_crypto(load_pem_public_key(f.read()), scheme="ed25519")
    envelope = Metadata.load(attestation)
    if not isinstance(envelope, Envelope):
        print(f"{attestation}: not a DSSE envelope", file=sys.stderr)
        return 1
    if envelope.payload_type != "application/vnd.in-toto+json":
        print(f"{attestation}: payloadType {envelope.payload_type}", file=sys.stderr)
        return 1
    try:
        envelope.verify([key], 1)
    except Exception as error:  # VerificationError, or whatever a malformed envelope raises
        print(f"{attestation}: does not verify: {error}", file=sys.stderr)
        return 1
    statement = json.loads(envelope.payload)
    if statement.get("_type") != "https://in-toto.io/Statement/v1":
        print(f"{attestation}: not an in-toto Statement v1", file=sys.stderr)
        return 1
    print(f"verified {key.keyid} {statement['subject'][0]['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
