"""Makes a moto server of a test's own into a store that enforces IAM, as a host
with no right to delete meets it.

    moto_iam.py ENDPOINT BUCKET setup
        Turns on versioning in BUCKET (which must exist), creates user `host`, who
        may list the bucket and get and put objects but not delete them, and user
        `admin`, who may do anything, then makes the server check every request
        against IAM. Prints {"host": [id, secret], "admin": [id, secret]}.

    moto_iam.py ENDPOINT BUCKET versions ADMIN_ID ADMIN_SECRET
        Prints {"versions": {key: count}, "delete_markers": [key, ...]}: a key with
        more than one version was overwritten, a delete marker was a delete.

Runs with the python of moto's virtualenv (boto3 comes with moto).
"""

import json
import sys
import urllib.request

import boto3


def client(service, endpoint, key_id="testing", secret="testing"):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )


def policy(statements):
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def setup(endpoint, bucket):
    s3 = client("s3", endpoint)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    iam = client("iam", endpoint)
    keys = {}
    host = policy(
        [
            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"},
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject"],
                "Resource": f"arn:aws:s3:::{bucket}/*",
            },
        ]
    )
    admin = policy([{"Effect": "Allow", "Action": "*", "Resource": "*"}])
    for user, document in [("host", host), ("admin", admin)]:
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=document)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = [key["AccessKeyId"], key["SecretAccessKey"]]
    # From now on every request is checked against IAM.
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}, method="POST"
    )
    urllib.request.urlopen(request).read()
    print(json.dumps(keys))


def versions(endpoint, bucket, key_id, secret):
    s3 = client("s3", endpoint, key_id, secret)
    counts, markers = {}, []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            counts[v["Key"]] = counts.get(v["Key"], 0) + 1
        markers.extend(m["Key"] for m in page.get("DeleteMarkers", []))
    print(json.dumps({"versions": counts, "delete_markers": markers}))


if __name__ == "__main__":
    endpoint, bucket, command = sys.argv[1:4]
    if command == "setup":
        setup(endpoint, bucket)
    elif command == "versions":
        versions(endpoint, bucket, *sys.argv[4:6])
    else:
        sys.exit(f"unknown command {command}")
