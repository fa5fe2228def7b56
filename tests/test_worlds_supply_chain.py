"""The supply chain on the fake engine: orders and shipments in transit, shops' and warehouses'
calls on arrival, customers who never call."""

from fake_engine import run_world

from worlds.supply_chain import SupplyChain


def test_orders_and_shipments_travel_and_calls_follow_arrivals():
    world, engine = run_world(SupplyChain, {"shops": 2, "customers_per_shop": 3,
                                            "buy_every_hours": 4, "order_hours": 24,
                                            "truck_hours": 24, "rail_hours": 72}, 24 * 12,
                              reply=["small", "truck", "regular"])
    m = world.metrics()
    assert m["sold"] > 0 and m["shipped_by_truck"] > 0 and m["shipped_by_rail"] == 0
    agents = {r.agent_id for r in engine.requests}
    assert agents <= {"warehouse0", "shop0", "shop1"}  # customers never call
    # A shop's reorder reaches the warehouse a day later: the warehouse's call comes then.
    reorders = [t for t, r in zip(engine.times, engine.requests) if "Reorder" in r.prompt]
    shipping = [t for t, r in zip(engine.times, engine.requests) if "Ship by" in r.prompt]
    assert reorders and shipping and min(shipping) == min(reorders) + 24
    pricing = [t for t, r in zip(engine.times, engine.requests) if "arrived" in r.prompt]
    assert pricing and min(pricing) == min(shipping) + 24  # by truck


def test_a_world_without_shops_is_refused():
    import pytest

    with pytest.raises(ValueError, match="need a warehouse and a shop"):
        run_world(SupplyChain, {"shops": 0}, 10)
