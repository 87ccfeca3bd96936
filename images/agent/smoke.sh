#!/usr/bin/env bash
# Smoke-test an agent image under the fleet's hardened defaults: send
# initialize, session/new and a prompt over stdio and print each reply with
# the seconds elapsed since `docker run`. With no API key the prompt is
# expected to fail with -32000 "Authentication required".
#
# Usage: images/agent/smoke.sh [image]   (default acp-fleet/claude-code-acp:0.16.2)
set -euo pipefail

IMAGE="${1:-acp-fleet/claude-code-acp:0.16.2}"
SECCOMP="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/worker/seccomp.json"

exec python3 - "$IMAGE" "$SECCOMP" <<'PY'
import json, os, subprocess, sys, time

image, seccomp = sys.argv[1:3]
# Killing the docker CLI does not stop the container, so it gets a name
# that the script removes at the end.
name = f"acp-smoke-{os.getpid()}"
tmpfs = {
    "/tmp": "rw,nosuid,nodev,noexec,size=64m,uid=1000,gid=1000,mode=1777",
    "/run": "rw,nosuid,nodev,noexec,size=8m,uid=1000,gid=1000,mode=0755",
    "/home/agent": "rw,nosuid,nodev,size=256m,uid=1000,gid=1000,mode=0700",
    "/workspace": "rw,nosuid,nodev,size=512m,uid=1000,gid=1000,mode=0755",
}
cmd = ["docker", "run", "-i", "--rm", "--name", name, "--network", "none", "--cap-drop", "ALL",
       "--security-opt", "no-new-privileges", "--security-opt",
       f"seccomp={seccomp}", "--read-only", "--init", "--user", "1000:1000",
       "--pids-limit", "256", "--memory", "1g", "--memory-swap", "1g"]
for path, opts in tmpfs.items():
    cmd += ["--tmpfs", f"{path}:{opts}"]
cmd += ["-e", "HOME=/home/agent", "-e", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
        image]

start = time.monotonic()
agent = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def call(msg_id, method, params):
    # Replies are matched by id; notifications in between are printed too.
    line = json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method,
                       "params": params})
    print(f">>> {line}", flush=True)
    agent.stdin.write(line + "\n")
    agent.stdin.flush()
    for raw in agent.stdout:
        print(f"<<< [{time.monotonic() - start:6.2f}s] {raw.rstrip()}", flush=True)
        reply = json.loads(raw)
        if reply.get("id") == msg_id and "method" not in reply:
            return reply
    sys.exit(f"agent closed stdout before answering {method}")


call(0, "initialize", {"protocolVersion": 1, "clientCapabilities": {}})
session = call(1, "session/new", {"cwd": "/workspace", "mcpServers": []})
session_id = session["result"]["sessionId"]
call(2, "session/prompt", {"sessionId": session_id,
                           "prompt": [{"type": "text", "text": "hi"}]})

# The fleet must not rely on the agent exiting at stdin EOF; report it.
agent.stdin.close()
try:
    code = agent.wait(timeout=5)
    print(f"agent exited {code} within 5 s of stdin EOF")
except subprocess.TimeoutExpired:
    print("agent still running 5 s after stdin EOF; removing it")
    subprocess.run(["docker", "rm", "-f", name], check=True,
                   stdout=subprocess.DEVNULL)
    agent.wait()
PY
