"""Planning: a Spec resolved against one model, before anything is touched.

    site.py     Site, the contract between planning and the runtime (plain data)
    layers.py   which repeated block ("layer") each module sits in
    select.py   selectors -> module paths, with PEFT's matching semantics
    planner.py  Spec x model -> Plan (every site, its hyper-parameters and provenance)
    plans.py    Plan, AdapterPlan, Unmatched: what planning produces (plain data)
    render.py   the plan as a table (`surgeon plan`)

Named `planning`, not `plan`, because `surgeon.plan` is the public function.
"""
