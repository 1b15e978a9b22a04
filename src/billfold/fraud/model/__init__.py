"""The fraud model: `synthetic` (a seeded world of users and injected fraud, as feature rows),
`training` (LightGBM + IsolationForest → a versioned artifact), `scorer` (the champion's
`ModelScore`, a challenger in shadow), `registry` (champion/challenger, the shipped champion in
`artifacts/`) and `evaluation` (rules alone vs rules + model). See docs/fraud.md."""
