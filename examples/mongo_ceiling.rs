//! What the MongoDB server itself does for the writes the handlers issue, in a tight loop: single upserts one at
//! a time, single upserts 16 at a time, and one `update` command carrying many upsert statements.
//!
//! ```sh
//! eval "$(scripts/stack env)" && cargo run --release --example mongo_ceiling -- 2000
//! ```

use std::time::Instant;

use futures::StreamExt;
use mongodb::bson::{Document, doc};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let uri = std::env::var("MONGODB_URI").expect("MONGODB_URI: eval \"$(scripts/stack env)\"");
    let client = mongodb::Client::with_uri_str(&uri).await?;
    let db = client.database(&format!(
        "ceiling_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let coll = db.collection::<Document>("c");
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();

    let t = Instant::now();
    for id in ids.iter().take(n / 10) {
        coll.update_one(doc! {"_id": id}, doc! {"$set": {"a": 1}})
            .upsert(true)
            .await?;
    }
    let sequential = (n / 10) as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    futures::stream::iter(ids.iter().skip(n / 10).take(n / 10))
        .map(|id| {
            let coll = coll.clone();
            async move {
                coll.update_one(doc! {"_id": id}, doc! {"$set": {"a": 1}})
                    .upsert(true)
                    .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let concurrent = (n / 10) as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    for chunk in ids.chunks(500) {
        let updates: Vec<Document> = chunk
            .iter()
            .map(|id| doc! {"q": {"_id": id}, "u": {"$set": {"b": 2}}, "upsert": true})
            .collect();
        db.run_command(doc! {"update": "c", "updates": updates, "ordered": false})
            .await?;
    }
    let bulk = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"single_sequential_ops_per_s": sequential, "single_concurrent16_ops_per_s": concurrent,
                           "bulk_update_command_ops_per_s": bulk})
    );
    db.drop().await?;
    Ok(())
}
