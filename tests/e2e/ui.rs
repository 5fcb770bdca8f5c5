//! The operator's web page in a real headless browser (Debian's Chromium, driven by
//! Playwright through tests/ui/ui.mjs) against the real binary: log in, see an event appear,
//! open its failed delivery, press Retry, see the new attempt. The screenshot is kept at
//! target/ui-screenshot.png. Plain HTTP checks cover what the browser does not: the login
//! wall, the bearer token for scripts, and forms posted without the page's token.
//!
//! Needs node, tests/ui/node_modules (npm ci in tests/ui) and /usr/bin/chromium, which
//! `.ci/run` installs; where any is missing the browser part says so and is skipped.

use std::path::Path;

use hookd_client::Client;
use hookd_client::v1::{CreateProducerRequest, ListDeliveriesRequest, TriggerRequest};

use crate::receiver::{Receiver, Reply};
use crate::support::{
    ADMIN_TOKEN, DEADLINE, HookdProcess, derive, eventually, listener_request, master_key, parse_addr, tools_present,
    which,
};

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_shows_an_event_and_retries_its_failed_delivery() {
    let receiver = Receiver::start().await;
    receiver.script("/down", |_, _| Reply::Status(503));
    let dir = tempfile::tempdir().unwrap();
    let key = master_key();
    let env = [
        ("HOOKD_MASTER_KEY", key.as_str()),
        ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("HOOKD_UI_LISTEN", "127.0.0.1:0"),
        ("HOOKD_RETRY_SCHEDULE", "50ms"),
    ];
    let hookd = HookdProcess::start(dir.path(), &env).await.unwrap();
    let ui = eventually("the web page's address in the log", || {
        let log = hookd.log_text();
        async move { log.lines().find(|line| line.contains("web page served")).and_then(parse_addr) }
    })
    .await;
    let ui = format!("http://{ui}");

    // The login wall, for people and for scripts.
    let http = client();
    let answer = http.get(&ui).send().await.unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(answer.headers()["location"], "/login");
    let scripted = http.get(format!("{ui}/listeners")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(scripted.status(), 200);
    let wrong = http.get(format!("{ui}/listeners")).bearer_auth("not-the-token").send().await.unwrap();
    assert_eq!(wrong.status(), 303, "a wrong bearer token gets the login page");
    // A form posted without the page's token (as another site would) is refused.
    let forged = http.post(format!("{ui}/events/evt_x/replay")).bearer_auth(ADMIN_TOKEN).body("").send().await.unwrap();
    assert_eq!(forged.status(), 403);

    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let created = admin.admin().create_producer(CreateProducerRequest { name: "shown".into() }).await.unwrap();
    let producer = admin.clone().with_api_key(&created.into_inner().api_key).unwrap();
    let hash = derive(&producer, "shown").await;
    producer.register().register_listener(listener_request(&hash, &receiver.url("/down"))).await.unwrap();
    let request =
        TriggerRequest { event_type: "shown".into(), payload: b"{\"shown\": true}".to_vec(), ..Default::default() };
    let event_id = producer.trigger_service().trigger(request).await.unwrap().into_inner().event_id;
    let delivery_id = eventually("the delivery failed for good", || {
        let (admin, event_id) = (admin.clone(), event_id.clone());
        async move {
            let request = ListDeliveriesRequest { event_id, ..Default::default() };
            let delivery = admin.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries.pop()?;
            (delivery.state == hookd_client::v1::DeliveryState::Failed as i32).then_some(delivery.id)
        }
    })
    .await;
    let requests_before = receiver.requests_to("/down").len();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("tests/ui/ui.mjs");
    let tools = [
        ("node", which("node")),
        ("tests/ui/node_modules (npm ci in tests/ui)", root.join("tests/ui/node_modules/playwright-core").exists()),
        ("/usr/bin/chromium", Path::new("/usr/bin/chromium").exists()),
    ];
    if !tools_present("the browser part of the web page test", &tools) {
        return;
    }
    let screenshot = root.join("target/ui-screenshot.png");
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .env("UI_URL", &ui)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("EVENT_ID", &event_id)
        .env("DELIVERY_ID", &delivery_id)
        .env("SCREENSHOT", &screenshot)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(DEADLINE * 2, run).await.expect("the browser test finishes").unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the browser test failed:\n{stdout}\n{stderr}");
    assert!(screenshot.exists());
    // The retry pressed in the browser reached the listener once more.
    assert_eq!(receiver.requests_to("/down").len(), requests_before + 1);
}
