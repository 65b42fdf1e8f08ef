//! Credentials and TLS: passwords from files and the environment, sink
//! credentials that never reach the logs, and PostgreSQL over verified TLS on
//! both the ordinary and the replication connections.
//!
//! The throwaway cluster trusts every local connection; these tests rewrite
//! its `pg_hba.conf` so that dedicated roles must authenticate with SCRAM or
//! must use TLS, and restart it. Certificates are made with `openssl`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_e2e::{ferry_bin, ferry_once, TestEnv};

const PG_PASSWORD: &str = "pg-Secret-4711";
const SINK_PASSWORD: &str = "s3cret";

/// Roles `secure_user` (SCRAM password) and `tls_user` (TLS only), both
/// superusers so that ferry may create what it needs.
async fn add_roles(env: &TestEnv) {
    let db = env.db().await;
    db.batch_execute(&format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE secure_user LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}';
         CREATE ROLE tls_user LOGIN SUPERUSER;
         CREATE TABLE items (id bigint PRIMARY KEY, t text);
         INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, 300) g;"
    ))
    .await
    .expect("roles and table");
    std::fs::write(
        env.pg.data_dir().join("pg_hba.conf"),
        "local     all          all                       trust\n\
         hostssl   all          tls_user     127.0.0.1/32 trust\n\
         hostnossl all          tls_user     127.0.0.1/32 reject\n\
         hostssl   replication  tls_user     127.0.0.1/32 trust\n\
         hostnossl replication  tls_user     127.0.0.1/32 reject\n\
         host      all          secure_user  127.0.0.1/32 scram-sha-256\n\
         host      replication  secure_user  127.0.0.1/32 scram-sha-256\n\
         host      all          all          127.0.0.1/32 trust\n\
         host      replication  all          127.0.0.1/32 trust\n",
    )
    .expect("pg_hba.conf");
}

fn restart(env: &TestEnv) {
    env.pg.restart().expect("restart PostgreSQL");
}

/// A config for index `items` over table `items`.
fn config(
    env: &TestEnv,
    source_url: &str,
    source_extra: &str,
    sink_url: &str,
    sink_extra: &str,
) -> PathBuf {
    env.write_config(&format!(
        "[source]\nurl = \"{source_url}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n{source_extra}\n\n\
         [sink]\nurl = \"{sink_url}\"\n{sink_extra}\n\n\
         [engine]\nmax_batch_delay_ms = 20\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[index]]\nname = \"{}\"\ntable = \"items\"\n",
        env.index("items"),
    ))
}

fn check(cfg: &Path) -> (i32, String) {
    let (code, out, err) = ferry_once(&["check", "--config", cfg.to_str().expect("utf8")]);
    (code, format!("{out}\n{err}"))
}

fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_password_from_a_file_works_end_to_end_and_is_never_printed() {
    let env = TestEnv::start().await;
    add_roles(&env).await;
    restart(&env);
    let url = format!("postgres://secure_user@127.0.0.1:{}/app", env.pg.port());

    // Without a password the role cannot log in: SCRAM is really in force.
    let cfg = config(&env, &url, "", env.os.url(), "");
    let (code, out) = check(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("source.password_file"), "{out}");

    // The right password, from a file with a trailing newline.
    let right = write_file(env.dir.path(), "pg-password", &format!("{PG_PASSWORD}\n"));
    let extra = format!("password_file = \"{}\"", right.display());
    let cfg = config(&env, &url, &extra, env.os.url(), "");
    let (code, out) = check(&cfg);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains(PG_PASSWORD), "the password leaked: {out}");

    // A wrong password names the key that holds it, not the password.
    let wrong = write_file(env.dir.path(), "pg-wrong", "Wrong-Password-99\n");
    let bad = config(
        &env,
        &url,
        &format!("password_file = \"{}\"", wrong.display()),
        env.os.url(),
        "",
    );
    let (code, out) = check(&bad);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("source.password_file"), "{out}");
    assert!(
        !out.contains("Wrong-Password-99"),
        "the password leaked: {out}"
    );

    // The same password from an environment variable.
    let by_env = config(
        &env,
        &url,
        "password_env = \"FERRY_E2E_PG_PASSWORD\"",
        env.os.url(),
        "",
    );
    let out = Command::new(ferry_bin())
        .args(["check", "--config"])
        .arg(&by_env)
        .env("FERRY_E2E_PG_PASSWORD", PG_PASSWORD)
        .env("RUST_LOG", "debug")
        .output()
        .expect("run ferry");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains(PG_PASSWORD), "the password leaked: {text}");

    // End to end: backfill and a live change over SCRAM (ordinary and replication sessions).
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("items", "items", Duration::from_secs(60))
        .await;
    env.db()
        .await
        .batch_execute(
            "INSERT INTO items VALUES (1000, 'live'); UPDATE items SET t = 'changed' WHERE id = 1;",
        )
        .await
        .expect("live change");
    env.assert_converges("items", "items", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
    assert!(
        !env.log().contains(PG_PASSWORD),
        "the password leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_credentials_never_reach_the_output_even_when_the_sink_is_down() {
    let env = TestEnv::start().await;
    env.db()
        .await
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, t text)")
        .await
        .expect("table");
    let pg_url = env.pg.url("app");

    // Credentials in sink.url, nothing listening on port 9.
    let cfg = config(
        &env,
        &pg_url,
        "",
        &format!("http://elastic:{SINK_PASSWORD}@127.0.0.1:9/"),
        "",
    );
    let (code, out) = check(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("127.0.0.1:9"),
        "the error should name the cluster: {out}"
    );
    assert!(!out.contains(SINK_PASSWORD), "the password leaked: {out}");

    // `run` keeps retrying an unreachable cluster and logs each failure.
    let ferry = env.run_ferry(&cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !env.log().contains("127.0.0.1:9") {
        assert!(
            std::time::Instant::now() < deadline,
            "ferry never logged the unreachable cluster: {}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ferry.kill();
    let log = env.log();
    assert!(!log.contains(SINK_PASSWORD), "the password leaked: {log}");

    // The same with username + password_file.
    let pw = write_file(
        env.dir.path(),
        "sink-password",
        &format!("{SINK_PASSWORD}\n"),
    );
    let cfg = config(
        &env,
        &pg_url,
        "",
        "http://127.0.0.1:9/",
        &format!(
            "username = \"elastic\"\npassword_file = \"{}\"",
            pw.display()
        ),
    );
    let (code, out) = check(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains(SINK_PASSWORD), "the password leaked: {out}");

    // And a password given twice is refused, naming both keys.
    let cfg = config(
        &env,
        &pg_url,
        "",
        &format!("http://elastic:{SINK_PASSWORD}@127.0.0.1:9/"),
        &format!("password_file = \"{}\"", pw.display()),
    );
    let (code, out) = check(&cfg);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("sink.password_file") && out.contains("sink.url"),
        "{out}"
    );
    assert!(!out.contains(SINK_PASSWORD), "the password leaked: {out}");
}

/// A CA, a server certificate for `localhost` only, and an unrelated CA.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn make() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            let subj = format!("/CN=ferry e2e {ca}");
            let key = format!("{ca}.key");
            let pem = format!("{ca}.pem");
            args.extend([
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &key,
                "-out",
                &pem,
            ]);
            openssl(d, &args);
        }
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        openssl(d, &csr);
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.crt",
            ],
        );
        Certs { dir }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl command is needed to make test certificates");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies a file into the data directory, owned like it, mode 0600 (the
/// server refuses a key file others can read).
fn install(env: &TestEnv, from: &Path, name: &str) {
    let data = env.pg.data_dir();
    let to = data.join(name);
    std::fs::copy(from, &to).expect("copy into the data directory");
    let meta = std::fs::metadata(data).expect("data dir");
    std::os::unix::fs::chown(&to, Some(meta.uid()), Some(meta.gid())).expect("chown");
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn enable_ssl(env: &TestEnv, certs: &Certs) {
    use std::io::Write;
    install(env, &certs.path("server.crt"), "server.crt");
    install(env, &certs.path("server.key"), "server.key");
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(env.pg.data_dir().join("postgresql.conf"))
        .expect("postgresql.conf");
    conf.write_all(b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        .expect("append");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_verified_tls_works_end_to_end_and_refuses_wrong_certificates() {
    let certs = Certs::make();
    let env = TestEnv::start().await;
    add_roles(&env).await;
    enable_ssl(&env, &certs);
    restart(&env);
    let port = env.pg.port();
    let ca = certs.path("ca.pem");
    let tls = |mode: &str, ca: &Path| {
        format!("sslmode = \"{mode}\"\nssl_root_cert = \"{}\"", ca.display())
    };
    let by_name = format!("postgres://tls_user@localhost:{port}/app");
    let by_ip = format!("postgres://tls_user@127.0.0.1:{port}/app");

    // tls_user may not connect without TLS.
    let cfg = config(&env, &by_name, "sslmode = \"disable\"", env.os.url(), "");
    let (code, out) = check(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("only over TLS") && out.contains("source.sslmode"),
        "{out}"
    );

    // verify-full with the right CA and a name the certificate lists.
    let good = config(&env, &by_name, &tls("verify-full", &ca), env.os.url(), "");
    let (code, out) = check(&good);
    assert_eq!(code, 0, "{out}");

    // The same through the URL's libpq parameters.
    let in_url = config(
        &env,
        &format!("{by_name}?sslmode=verify-full&sslrootcert={}", ca.display()),
        "",
        env.os.url(),
        "",
    );
    let (code, out) = check(&in_url);
    assert_eq!(code, 0, "{out}");

    // verify-full towards an address the certificate does not list.
    let wrong_host = config(&env, &by_ip, &tls("verify-full", &ca), env.os.url(), "");
    let (code, out) = check(&wrong_host);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not valid for"), "{out}");
    assert!(out.contains("source.sslmode"), "{out}");

    // A CA that did not sign the certificate, in both verifying modes.
    for mode in ["verify-full", "verify-ca"] {
        let wrong_ca = config(
            &env,
            &by_name,
            &tls(mode, &certs.path("other-ca.pem")),
            env.os.url(),
            "",
        );
        let (code, out) = check(&wrong_ca);
        assert_ne!(code, 0, "{mode}: {out}");
        assert!(out.contains("source.ssl_root_cert"), "{mode}: {out}");
    }

    // End to end over verify-full: backfill, then live changes.
    let ferry = env.run_ferry(&good);
    env.assert_converges("items", "items", Duration::from_secs(60))
        .await;
    let db = env.db().await;
    db.batch_execute("INSERT INTO items VALUES (1000, 'live'); DELETE FROM items WHERE id = 2;")
        .await
        .expect("live change");
    env.assert_converges("items", "items", Duration::from_secs(60))
        .await;
    // The replication session is encrypted too (pg_hba allows nothing else).
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s ON s.pid = a.pid \
             WHERE a.usename = 'tls_user' AND a.backend_type = 'walsender'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let (encrypted, total): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        total >= 1 && encrypted == total,
        "walsenders: {encrypted} of {total} on TLS"
    );
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());

    // verify-ca accepts the certificate by IP address, on the replication session too.
    let by_ca = config(&env, &by_ip, &tls("verify-ca", &ca), env.os.url(), "");
    let ferry = env.run_ferry(&by_ca);
    db.batch_execute("UPDATE items SET t = 'via verify-ca' WHERE id = 3;")
        .await
        .expect("live change");
    env.assert_converges("items", "items", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

/// A non-superuser role under row-level security would copy only the rows
/// its policies show while the stream delivers every change: `check` and
/// `run` refuse, naming the table and the SQL that fixes it, and a policy
/// that plainly grants every row is accepted. With BYPASSRLS the index
/// holds every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_never_yields_a_silent_subset() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE ROLE reader LOGIN REPLICATION;
         CREATE TABLE ledger (id int PRIMARY KEY, v text);
         INSERT INTO ledger SELECT g, 'entry ' || g FROM generate_series(1, 200) g;
         ALTER TABLE ledger ENABLE ROW LEVEL SECURITY;
         CREATE POLICY even_only ON ledger FOR SELECT TO reader USING (id % 2 = 0);
         CREATE TABLE notes (id int PRIMARY KEY, v text);
         INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 50) g;
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY every_row ON notes FOR SELECT TO reader USING (true);
         GRANT SELECT ON ledger, notes TO reader;
         CREATE PUBLICATION ferry_test FOR TABLE ledger, notes;",
    )
    .await
    .expect("schema");
    let url = env.pg.url("app").replace("postgres@", "reader@");
    let cfg = env.write_config(&format!(
        "[source]\nurl = \"{url}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n\
         [sink]\nurl = \"{}\"\n\n[engine]\nmax_batch_delay_ms = 20\n\n\
         [[index]]\nname = \"{}\"\ntable = \"ledger\"\n\n[[index]]\nname = \"{}\"\ntable = \"notes\"\n",
        env.os.url(),
        env.index("ledger"),
        env.index("notes"),
    ));

    let (code, out) = check(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("table public.ledger has row-level security"),
        "{out}"
    );
    assert!(out.contains(r#"ALTER ROLE "reader" BYPASSRLS;"#), "{out}");
    assert!(
        out.contains(
            r#"CREATE POLICY ferry_reads_all ON "public"."ledger" FOR SELECT TO "reader" USING (true);"#
        ),
        "{out}"
    );
    assert!(
        !out.contains("public.notes"),
        "a policy granting every row was refused: {out}"
    );

    // run refuses before it creates a slot or copies a row.
    let mut ferry = env.run_ferry(&cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ferry.is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "ferry run did not refuse: {}",
            env.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ferry.stop(), Some(1), "{}", env.log_tail());
    let log = env.log();
    assert!(
        log.contains("table public.ledger has row-level security"),
        "{log}"
    );
    assert!(log.contains(r#"ALTER ROLE "reader" BYPASSRLS;"#), "{log}");
    assert_eq!(
        env.count("ledger").await,
        0,
        "documents were written before the refusal"
    );
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "a slot was created before the refusal");

    db.batch_execute("ALTER ROLE reader BYPASSRLS")
        .await
        .expect("bypassrls");
    let (code, out) = check(&cfg);
    assert_eq!(code, 0, "{out}");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("ledger", "ledger", Duration::from_secs(60))
        .await;
    env.assert_converges("notes", "notes", Duration::from_secs(60))
        .await;
    assert_eq!(env.count("ledger").await, 200);
    db.batch_execute("INSERT INTO ledger VALUES (201, 'live'); DELETE FROM ledger WHERE id = 2;")
        .await
        .expect("live change");
    env.assert_converges("ledger", "ledger", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}
