#!/usr/bin/env python3
"""Probes a hub binary for the admin-surface findings of issue 16 and prints
what it answers, one line per finding: how RELIABILITY.md's before/after
figures were taken. `old` configures the single `password_hash` of hubs
before issue 16, `new` a named administrator. Needs curl.

usage: tests/admin-probe.py target/debug/shuyuan-hub new"""
import subprocess, sys, tempfile, time, os, threading, socket
hub, mode = sys.argv[1], sys.argv[2]
PW = "correct horse battery staple"
d = tempfile.mkdtemp()
def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
cfg = f"{d}/hub.toml"
def write(extra):
    open(cfg, "w").write(f'[hub]\nname = "probe hub"\nlisten = "127.0.0.1:{free_port()}"\nkey_file = "hub.key"\ndata_dir = "data"\n[admin]\nlisten = "127.0.0.1:0"\n{extra}')
write("")
subprocess.run([hub, "--config", cfg, "init", "--key-only"], check=True, capture_output=True)
args = [hub, "--config", cfg, "admin-password"] + (["zhang.wei"] if mode == "new" else [])
line = subprocess.run(args, input=PW + "\n", text=True, check=True, capture_output=True).stdout.strip()
write(f'password_hash = "{line}"\n' if mode == "old" else f"accounts.{line}\n")
p = subprocess.Popen([hub, "--config", cfg, "run"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
for _ in range(100):
    if os.path.exists(f"{d}/data/admin.addr"): break
    time.sleep(0.1)
time.sleep(0.5)
base = "http://" + open(f"{d}/data/admin.addr").read().strip()
user = "zhang.wei" if mode == "new" else "admin"
def curl(*a, timeout=30):
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-D", "-", "--max-time", str(timeout), *a], capture_output=True, text=True)
    return r.stdout
def status(h): return h.split(" ")[1] if h.startswith("HTTP") else "none"
def rss(): return int([l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
h = curl("-u", f"{user}:{PW}", "-H", "Origin: http://evil.example", "-d", "code=X&approve=1&reviewer=attacker", f"{base}/catalog/review")
print(f"1 CSRF: POST /catalog/review with basic + Origin evil -> {status(h)}")
h = curl(f"{base}/metrics")
print("1 401 challenge:", [l.strip() for l in h.splitlines() if l.lower().startswith("www-authenticate")])
before = rss(); peak = before
ts = [threading.Thread(target=curl, args=("--interface", f"127.0.1.{i+1}", "-u", f"{user}:guess{i}", f"{base}/api/v1/status")) for i in range(64)]
for t in ts: t.start()
while any(t.is_alive() for t in ts): peak = max(peak, rss()); time.sleep(0.005)
time.sleep(1)
print(f"2 memory: 64 parallel wrong guesses: RSS {before} MiB -> peak {peak} MiB -> after {rss()} MiB")
sts = []
for i in range(8):
    body = '{"user":"%s","password":"guess"}' % user if mode == "new" else '{"password":"guess"}'
    sts.append(status(curl("--interface", "127.0.0.9", "-H", "content-type: application/json", "-d", body, f"{base}/api/v1/login")))
print("4 brute force: 8 wrong API logins from one address ->", sts)
form = ["--data-urlencode", f"password={PW}", "--data-urlencode", "next=/\t/evil.example"] + (["--data-urlencode", f"user={user}"] if mode == "new" else [])
h = curl("--interface", "127.0.0.10", *form, f"{base}/login")
print("5 redirect: next=/<TAB>/evil.example ->", [l.strip() for l in h.splitlines() if l.lower().startswith("location")])
cookie = [l.split(":", 1)[1].strip().split(";")[0] for l in h.splitlines() if l.lower().startswith("set-cookie")][0]
ev = subprocess.Popen(["curl", "-s", "-N", "--max-time", "25", "-H", f"Cookie: {cookie}", f"{base}/events"], stdout=subprocess.DEVNULL)
time.sleep(1)
curl("-H", f"Cookie: {cookie}", "-X", "POST", f"{base}/logout")
t0 = time.time(); ev.wait()
print(f"6 events after logout: stream ended after {time.time()-t0:.1f} s (curl gives up at 25 s)")
h = curl(f"{base}/login")
print("7 headers on /login:", [l.split(":")[0] for l in h.splitlines() if l.lower().split(":")[0] in ("content-security-policy", "x-frame-options", "x-content-type-options")])
body = subprocess.run(["curl", "-s", f"{base}/nope"], capture_output=True, text=True).stdout
print("8 404 page names the hub:", "probe hub" in body)
p.terminate(); p.wait()
write("")
p = subprocess.Popen([hub, "--config", cfg, "run"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
time.sleep(2)
base = "http://" + open(f"{d}/data/admin.addr").read().strip()
for host in ["[::1]evil.example", "localhost:27881@evil"]:
    print(f"8 open console, Host {host} ->", status(curl("-H", f"Host: {host}", f"{base}/api/v1/status")))
p.terminate(); p.wait()
