#!/bin/sh
# A local CA and one certificate for the whole cluster, for `--tls-dir` (protos/cluster_tls.py).
#   deploy/certs.sh DIR [DAYS]
# writes DIR/ca.crt, DIR/tls.crt, DIR/tls.key (what every process reads) and DIR/ca.key (the
# CA's key: keep it off the cluster's machines; rerunning with it present reuses the CA and
# issues a fresh certificate). The certificate names SERVER_NAME, which peers check instead of
# addresses, and serves as client and server certificate alike. For Kubernetes:
#   kubectl create secret generic pdserve-tls --from-file=DIR/ca.crt --from-file=DIR/tls.crt \
#     --from-file=DIR/tls.key
set -eu
dir=${1:?usage: deploy/certs.sh DIR [DAYS]}
days=${2:-365}
name=pdserve-cluster  # protos/cluster_tls.py SERVER_NAME
command -v openssl >/dev/null || { echo "deploy/certs.sh needs openssl (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/ca.key" ] || [ ! -f "$dir/ca.crt" ]; then
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$days" -subj "/CN=pdserve cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
fi
ext=$(mktemp)
trap 'rm -f "$ext" "$dir/tls.csr"' EXIT
printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
  "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:$name" >"$ext"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/tls.key" \
  -out "$dir/tls.csr" -subj "/CN=$name" 2>/dev/null
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -out "$dir/tls.crt" -days "$days" -extfile "$ext" 2>/dev/null
rm -f "$dir/ca.srl"
chmod 644 "$dir/ca.crt" "$dir/tls.crt"
echo "wrote $dir/ca.crt, $dir/tls.crt, $dir/tls.key (and the CA's key, $dir/ca.key: keep it elsewhere)"
