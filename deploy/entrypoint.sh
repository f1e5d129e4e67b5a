#!/usr/bin/env bash
# kiln's container entrypoint: starts tritonserver on kiln's model repository with the flags a
# Kubernetes pod needs, read from the environment (deploy/helm/kiln sets them; deploy/Dockerfile
# sets the defaults). Arguments given to the container are appended to tritonserver's own.
#
#   KILN_MODEL_REPOSITORY       the repository: an absolute path (default: the one baked into the
#                               image), or s3://bucket/prefix, s3://http(s)://host:port/bucket/prefix,
#                               gs://bucket/prefix, as://account/container/prefix (Triton reads it;
#                               credentials from AWS_* / GOOGLE_APPLICATION_CREDENTIALS / AZURE_*)
#   KILN_REPOSITORY_COPY_TO     with an s3:// repository: copy it into this (empty) folder first
#                               (deploy/fetch_repository.py) and serve the copy; Triton reading a
#                               bucket itself cannot serve models that read other models' files
#                               (fused pipelines, their steps): see fetch_repository.py
#   KILN_PYTHON                 the Python that runs fetch_repository.py (default python3), and
#   KILN_REPOSITORY_FETCHER     the script (default: fetch_repository.py beside this file)
#   KILN_LOAD_MODELS            models to load at start, comma- or space-separated, or '*' (all);
#                               the server runs in explicit model-control mode either way
#   KILN_REPOSITORY_API         'restricted' (default): the model-repository API (load, unload,
#                               index) needs the key; 'open': anyone reaching the port may use it
#   KILN_REPOSITORY_KEY_FILE    a file holding the key (a mounted Secret), or
#   KILN_REPOSITORY_KEY         the key itself (at least 16 of A-Z a-z 0-9 _ . ~ + / -)
#   KILN_REPOSITORY_KEY_HEADER  the header clients send it in (default kiln-repository-key; gRPC
#                               metadata triton-grpc-protocol-<header>)
#   KILN_EXIT_TIMEOUT_S         --exit-timeout-secs: after SIGTERM, how long Triton drains
#                               in-flight requests (the chart keeps terminationGracePeriodSeconds
#                               above its preStop sleep plus this)
#   KILN_HTTP_PORT / KILN_GRPC_PORT / KILN_METRICS_PORT   default 8000 / 8001 / 8002
#   KILN_BACKEND_DIRECTORY      Triton's backends, kiln's Python-based ones among them (default
#                               /opt/tritonserver/backends)
#   KILN_TRITONSERVER           the binary (default: tritonserver on PATH)
#   KILN_LOG_VERBOSE            --log-verbose (default 0)
#   KILN_DRY_RUN=1              print the commands (the copy, if any, then tritonserver with the key
#                               replaced by its sha256), one a line, and exit 0
#
# The checks mirror kiln.server's (repository_api.check_repository_key, process.check_model_control)
# so that a pod fails at once, with the reason in its log, instead of serving an unlocked or
# half-configured repository.
set -euo pipefail

readonly PROG="kiln entrypoint"
readonly REPOSITORY_API_NAME="model-repository"  # Triton's name of the load/unload/index API
readonly KEY_PATTERN='^[A-Za-z0-9_.~+/-]{16,}$'   # what Triton's <api>:<header>=<key> flag carries
readonly HEADER_PATTERN='^[a-z0-9][a-z0-9-]{0,63}$'
readonly MODEL_PATTERN='^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$'
readonly PORT_PATTERN='^[0-9]{1,5}$'

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

repository="${KILN_MODEL_REPOSITORY:-/opt/kiln/model_repository}"
load_models="${KILN_LOAD_MODELS-*}"
repository_api="${KILN_REPOSITORY_API:-restricted}"
key_header="${KILN_REPOSITORY_KEY_HEADER:-kiln-repository-key}"
exit_timeout="${KILN_EXIT_TIMEOUT_S:-30}"
backend_directory="${KILN_BACKEND_DIRECTORY:-/opt/tritonserver/backends}"
tritonserver="${KILN_TRITONSERVER:-tritonserver}"
copy_to="${KILN_REPOSITORY_COPY_TO:-}"
python="${KILN_PYTHON:-python3}"
fetcher="${KILN_REPOSITORY_FETCHER:-$(dirname "$(readlink -f "$0")")/fetch_repository.py}"
log_verbose="${KILN_LOG_VERBOSE:-0}"
dry_run="${KILN_DRY_RUN:-0}"

# --- the repository: a local folder, or a URL (copied first, or read by Triton itself) ---
fetch_command=()
served_repository="$repository"
case "$repository" in
    s3://?*)
        if [[ -n "$copy_to" ]]; then
            [[ "$copy_to" == /* ]] || die "KILN_REPOSITORY_COPY_TO must be an absolute path, got '$copy_to'"
            fetch_command=("$python" "$fetcher" "$repository" "$copy_to")
            served_repository="$copy_to"
        fi
        ;;
    gs://?* | as://?*)
        [[ -z "$copy_to" ]] || die "KILN_REPOSITORY_COPY_TO copies s3:// repositories only, got" \
            "'$repository' (Google Cloud Storage: its S3-compatible endpoint with HMAC keys," \
            "s3://https://storage.googleapis.com:443/BUCKET/PREFIX)"
        ;;
    /*)
        [[ -d "$repository" ]] || die "KILN_MODEL_REPOSITORY=$repository is not a folder" \
            "(the image bakes the repository at /opt/kiln/model_repository; mount one there or" \
            "give an s3://, gs:// or as:// URL)"
        ;;
    *) die "KILN_MODEL_REPOSITORY must be an absolute path or an s3://, gs:// or as:// URL, got '$repository'" ;;
esac

# --- models to load: '*' alone (Triton refuses '*' beside other names), or names ---
read -r -a models <<< "${load_models//,/ }"
(( ${#models[@]} > 0 )) || die "KILN_LOAD_MODELS is empty: name the models to load, or '*' for all"
for model in "${models[@]}"; do
    if [[ "$model" == "*" ]]; then
        (( ${#models[@]} == 1 )) || die "KILN_LOAD_MODELS='$load_models': '*' (all models) must be alone"
    elif [[ ! "$model" =~ $MODEL_PATTERN ]]; then
        die "KILN_LOAD_MODELS='$load_models': '$model' is not a model name ($MODEL_PATTERN)"
    fi
done

# --- numbers ---
[[ "$exit_timeout" =~ ^[0-9]+$ ]] || die "KILN_EXIT_TIMEOUT_S must be a whole number of seconds, got '$exit_timeout'"
[[ "$log_verbose" =~ ^[0-9]+$ ]] || die "KILN_LOG_VERBOSE must be a whole number, got '$log_verbose'"
http_port="${KILN_HTTP_PORT:-8000}"
grpc_port="${KILN_GRPC_PORT:-8001}"
metrics_port="${KILN_METRICS_PORT:-8002}"
for pair in "KILN_HTTP_PORT=$http_port" "KILN_GRPC_PORT=$grpc_port" "KILN_METRICS_PORT=$metrics_port"; do
    port="${pair#*=}"
    if [[ ! "$port" =~ $PORT_PATTERN ]] || (( 10#$port < 1 || 10#$port > 65535 )); then
        die "${pair%%=*} must be a port (1-65535), got '$port'"
    fi
done

# --- the model-repository API: restricted to a key unless explicitly opened ---
restricted_args=()
shown_restricted_args=()
case "$repository_api" in
    restricted)
        if [[ -n "${KILN_REPOSITORY_KEY_FILE:-}" && -n "${KILN_REPOSITORY_KEY:-}" ]]; then
            die "both KILN_REPOSITORY_KEY_FILE and KILN_REPOSITORY_KEY are set: give the key one way"
        elif [[ -n "${KILN_REPOSITORY_KEY_FILE:-}" ]]; then
            [[ -r "$KILN_REPOSITORY_KEY_FILE" ]] || die "KILN_REPOSITORY_KEY_FILE=$KILN_REPOSITORY_KEY_FILE cannot be read"
            # A Secret's file may end in a newline; the key itself never holds whitespace.
            key="$(tr -d '\r\n' < "$KILN_REPOSITORY_KEY_FILE")"
            key_source="KILN_REPOSITORY_KEY_FILE ($KILN_REPOSITORY_KEY_FILE)"
        elif [[ -n "${KILN_REPOSITORY_KEY:-}" ]]; then
            key="$KILN_REPOSITORY_KEY"
            key_source="KILN_REPOSITORY_KEY"
        else
            die "the model-repository API is restricted (KILN_REPOSITORY_API=restricted) but no key" \
                "is given: mount one and set KILN_REPOSITORY_KEY_FILE, or set KILN_REPOSITORY_KEY" \
                "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))' makes one), or set" \
                "KILN_REPOSITORY_API=open to let anyone who reaches the port load and unload models"
        fi
        if [[ ! "$key" =~ $KEY_PATTERN ]]; then
            others=""
            (( ${#key} >= 16 )) && others=" with others"
            die "the repository key from $key_source must be at least 16 characters of" \
                "A-Z a-z 0-9 _ . ~ + / -; got ${#key} characters$others"
        fi
        [[ "$key_header" =~ $HEADER_PATTERN ]] || die "KILN_REPOSITORY_KEY_HEADER must be lowercase" \
            "letters, digits and '-' (at most 64), got '$key_header'"
        restriction="$REPOSITORY_API_NAME:$key_header"
        restricted_args=("--http-restricted-api=$restriction=$key" "--grpc-restricted-protocol=$restriction=$key")
        shown_key="<sha256:$(printf '%s' "$key" | sha256sum | cut -c1-16)>"
        shown_restricted_args=("--http-restricted-api=$restriction=$shown_key" "--grpc-restricted-protocol=$restriction=$shown_key")
        ;;
    open)
        echo "$PROG: warning: the model-repository API is open (KILN_REPOSITORY_API=open): anyone" \
            "who reaches port $http_port or $grpc_port can load and unload models" >&2
        ;;
    *) die "KILN_REPOSITORY_API must be 'restricted' or 'open', got '$repository_api'" ;;
esac

command=(
    "$tritonserver"
    "--model-repository=$served_repository"
    "--backend-directory=$backend_directory"
    "--model-control-mode=explicit"
)
for model in "${models[@]}"; do
    command+=("--load-model=$model")
done
command+=(
    # A model that fails to load leaves the others serving; /v2/health/ready stays false
    # (strict readiness), so the pod never takes traffic half-loaded and the startup probe
    # restarts it once its window is over.
    "--exit-on-error=false"
    "--strict-readiness=true"
    "--exit-timeout-secs=$exit_timeout"
    "--http-port=$http_port"
    "--grpc-port=$grpc_port"
    "--metrics-port=$metrics_port"
    "--log-verbose=$log_verbose"
)

if [[ "$dry_run" == "1" ]]; then
    if (( ${#fetch_command[@]} > 0 )); then
        printf '%q ' "${fetch_command[@]}"
        printf '\n'
    fi
    shown=("${command[@]}" "${shown_restricted_args[@]}" "$@")
    printf '%q ' "${shown[@]}"
    printf '\n'
    exit 0
fi
if (( ${#fetch_command[@]} > 0 )); then
    "${fetch_command[@]}" || die "could not copy the repository $repository into $copy_to (above)"
fi
# exec: tritonserver becomes the container's main process and receives SIGTERM itself, which
# starts its drain (not ready at once, in-flight requests answered for up to --exit-timeout-secs).
exec "${command[@]}" "${restricted_args[@]}" "$@"
