//! The deployment files are checked, not just shipped: Kubernetes manifests against the API
//! schemas (kubernetes-validate, strict) and yamllint; the Dockerfile with hadolint; the systemd
//! unit with `systemd-analyze verify`; the configurations they carry with `check`. A validator
//! that is missing fails the test (`.ci/run` installs them all); none is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs `tool` with `args`; fails with its output unless it succeeds.
#[track_caller]
fn passes(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required (.ci/run installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?}:\n{text}");
    text
}

const MANIFESTS: [&str; 6] = [
    "deploy/kubernetes/deployment.yaml",
    "deploy/kubernetes/service.yaml",
    "deploy/kubernetes/configmap.yaml",
    "deploy/kubernetes/pdb.yaml",
    "deploy/kubernetes/hpa.yaml",
    "deploy/kubernetes/networkpolicy.yaml",
];

#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let files: Vec<String> = MANIFESTS
        .iter()
        .map(|m| repo(m).display().to_string())
        .collect();
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(String::as_str));
    let out = passes("kubernetes-validate", &args);
    assert_eq!(out.matches(" passed for resource ").count(), 7, "{out}");
}

#[test]
fn yaml_files_pass_yamllint() {
    let config = repo("deploy/.yamllint").display().to_string();
    let targets = [
        repo("deploy/kubernetes"),
        repo("deploy/prometheus/alerts.yml"),
        repo("deploy/docker-compose.yml"),
    ];
    let mut args = vec!["--strict".to_owned(), "-c".to_owned(), config];
    args.extend(targets.iter().map(|t| t.display().to_string()));
    passes(
        "yamllint",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[test]
fn the_dockerfile_passes_hadolint() {
    passes(
        "hadolint",
        &[&repo("deploy/Dockerfile").display().to_string()],
    );
}

/// `systemd-analyze verify` wants the executables to exist: the unit is checked with the built
/// binary in place of /usr/local/bin/msgflash-gateway, everything else as shipped.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo("deploy/msgflash-gateway.service")).unwrap();
    for must in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "DynamicUser=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(must), "the unit lost {must}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("msgflash-gateway.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/msgflash-gateway",
            env!("CARGO_BIN_EXE_msgflash-gateway"),
        ),
    )
    .unwrap();
    passes("systemd-analyze", &["verify", &path.display().to_string()]);
}

/// The ConfigMap's files are the shipped ones, verbatim, and `check` accepts its gateway.toml,
/// as it does the compose file's.
#[test]
fn the_configurations_the_deployments_carry_are_valid() {
    let extract = r#"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
out = sys.argv[2]
for name, text in doc["data"].items():
    open(out + "/" + name, "w").write(text)
"#;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    passes(
        "python3",
        &[
            "-c",
            extract,
            &repo("deploy/kubernetes/configmap.yaml")
                .display()
                .to_string(),
            &out,
        ],
    );
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    assert_eq!(
        read(&dir.path().join("gateway.toml")),
        read(&repo("deploy/kubernetes/gateway.toml"))
    );
    for policy in ["plans.toml", "routes.toml"] {
        assert_eq!(
            read(&dir.path().join(policy)),
            read(&repo(&format!("lua-free-policies/{policy}"))),
            "the ConfigMap's {policy} differs from lua-free-policies/{policy}"
        );
    }
    // Where the pod mounts the policies, this checkout's own.
    let policies = repo("lua-free-policies").display().to_string();
    let k8s =
        read(&dir.path().join("gateway.toml")).replace("/etc/msgflash-gateway/policies", &policies);
    std::fs::write(dir.path().join("k8s.toml"), k8s).unwrap();
    // Compose resolves "echo" on its own network; here it stands for any address.
    let compose = format!(
        "{}\n[policies]\ndir = \"{policies}\"\n",
        read(&repo("deploy/gateway.compose.toml")).replace("\"echo:80\"", "\"127.0.0.1:80\"")
    );
    std::fs::write(dir.path().join("compose.toml"), compose).unwrap();
    for config in ["k8s.toml", "compose.toml"] {
        let path = dir.path().join(config).display().to_string();
        let out = passes(
            env!("CARGO_BIN_EXE_msgflash-gateway"),
            &["check", "-c", &path],
        );
        assert!(out.contains(": ok ("), "{out}");
    }
}

/// The container's command line as Kubernetes runs it (the image's ENTRYPOINT, then the pod's
/// args) parses, and `check` (in place of `run`) accepts the configuration it names.
#[test]
fn the_pod_command_line_is_one_the_binary_takes() {
    let dockerfile = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let entrypoint: Vec<String> = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .map(|json| serde_json::from_str(json).unwrap())
        .expect("an ENTRYPOINT");
    let args = passes(
        "python3",
        &[
            "-c",
            "import sys, yaml, json; d = yaml.safe_load(open(sys.argv[1])); \
             print(json.dumps(d['spec']['template']['spec']['containers'][0]['args']))",
            &repo("deploy/kubernetes/deployment.yaml")
                .display()
                .to_string(),
        ],
    );
    let args: Vec<String> = serde_json::from_str(args.trim()).unwrap();
    assert_eq!(args, ["run"]);
    // The configuration the pod mounts, with this checkout's policies.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(repo("deploy/kubernetes/gateway.toml"))
            .unwrap()
            .replace(
                "/etc/msgflash-gateway/policies",
                &repo("lua-free-policies").display().to_string(),
            ),
    )
    .unwrap();
    let argv: Vec<String> = entrypoint[1..]
        .iter()
        .chain(&args)
        .map(|a| {
            if a == "/etc/msgflash-gateway/gateway.toml" {
                config.display().to_string()
            } else if a == "run" {
                "check".to_owned()
            } else {
                a.clone()
            }
        })
        .collect();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    passes(env!("CARGO_BIN_EXE_msgflash-gateway"), &argv);
}
