#!/bin/sh
# The compose service `minio-init` (image minio/mc) runs this at every `docker-compose up`; idempotent.
# Creates the image bucket and the audit-anchor bucket (object lock: anchors get a COMPLIANCE
# retention), and the services' MinIO user (keys: the secrets s3-access-key / s3-secret-key) with a
# policy limited to those two buckets and no deletion in the audit-anchor bucket. The root
# credentials are used here only.
set -eu
s=/run/secrets
bucket=${QUORUM_S3_BUCKET:-quorum}
mc alias set quorum http://minio:9000 "$(cat $s/minio-root-user)" "$(cat $s/minio-root-password)" >/dev/null
mc mb --ignore-existing "quorum/$bucket"
mc mb --ignore-existing --with-lock "quorum/$bucket-audit"
cat > /tmp/quorum-app.json <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:ListBucket", "s3:GetBucketLocation", "s3:GetBucketObjectLockConfiguration",
                "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::$bucket", "arn:aws:s3:::$bucket-audit"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$bucket/*"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:PutObjectRetention", "s3:GetObjectRetention"],
     "Resource": ["arn:aws:s3:::$bucket-audit/*"]}
  ]
}
JSON
mc admin policy create quorum quorum-app /tmp/quorum-app.json
mc admin user add quorum "$(cat $s/s3-access-key)" "$(cat $s/s3-secret-key)"
mc admin policy attach quorum quorum-app --user "$(cat $s/s3-access-key)" 2>/dev/null \
  || mc admin policy entities quorum --user "$(cat $s/s3-access-key)" | grep -q quorum-app
echo "minio-init: buckets $bucket, $bucket-audit; user $(cat $s/s3-access-key) with policy quorum-app"
