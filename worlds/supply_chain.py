"""Supply chain: orders and shipments that travel for days between shops and warehouses.

Customers (who never ask the LLM) buy from their shop now and then. A shop sells from stock;
when its stock falls to the reorder point it asks the LLM how much to reorder (small or large)
and sends the order to its warehouse, which takes ``order_hours`` to arrive. The warehouse asks
the LLM how to ship it (truck or rail) and sends the goods back: ``truck_hours`` or
``rail_hours`` on the way. When a shipment arrives the shop asks the LLM how to price the
restocked goods. Time is in hours.

Distance sources it exercises: **messages in transit** — an order or a shipment on its way is
an event in the queue (``send(..., delay=...)``), so when a warehouse or a shop will next call
is known exactly from the arrival; and a **hint**: when a shop will reorder depends on its
stock, which only it knows, so after each sale it tells the oracle when, at the usual pace of
its customers' purchases (they never call the LLM; they reach the shop through the graph).
"""

from __future__ import annotations

from agents import LLMAgent
from scalesim import Agent, World

SIZES = {"small": 10, "large": 30}
MODES = ("truck", "rail")


class Customer(Agent["SupplyChain"]):
    """Buys one item from its shop every so often (exponential gaps); no LLM."""

    calls_llm = False

    def __init__(self, name: str, shop: str, every_hours: float) -> None:
        super().__init__(name)
        self.shop, self.every_hours = shop, every_hours

    def run(self):
        while True:
            yield self.wait(self.world.random.expovariate(1 / self.every_hours), label="shop")
            self.send(self.shop, "buy")


class Shop(LLMAgent["SupplyChain"]):
    """Sells from stock, reorders at the reorder point, prices each shipment as it arrives."""

    def __init__(self, name: str, persona: str, warehouse: str, stock: int, **kwargs) -> None:
        super().__init__(name, persona, **kwargs)
        self.warehouse, self.stock = warehouse, stock
        self.customers = 1
        self.ordered = False
        self.sold = self.missed = self.discounts = 0

    def run(self):
        while True:
            message = yield self.receive(label="inbox")
            if message.content == "buy":
                if self.stock:
                    self.stock, self.sold = self.stock - 1, self.sold + 1
                else:
                    self.missed += 1
                if self.stock > self.world.reorder_point and not self.ordered:
                    # Only the shop knows its stock: when it will reorder, at the usual pace.
                    self.world.hint(self, (self.stock - self.world.reorder_point)
                                    * self.world.buy_every_hours / self.customers)
                if self.stock <= self.world.reorder_point and not self.ordered:
                    size = yield from self.choose(
                        f"You have {self.stock} items left. Reorder a small or a large batch?",
                        list(SIZES))
                    self.ordered = True
                    self.send(self.warehouse, (self.name, SIZES[size]),
                              delay=self.world.order_hours)
            else:  # a shipment
                self.stock += message.content
                self.ordered = False
                price = yield from self.choose(
                    f"{message.content} items arrived; you have {self.stock}. Price them at a "
                    "discount or regular?", ["discount", "regular"])
                self.discounts += price == "discount"


class Warehouse(LLMAgent["SupplyChain"]):
    """Ships each order as it arrives, by truck or by rail."""

    def __init__(self, name: str, persona: str, **kwargs) -> None:
        super().__init__(name, persona, **kwargs)
        self.shipped = {mode: 0 for mode in MODES}

    def run(self):
        while True:
            message = yield self.receive(label="orders")
            shop, quantity = message.content
            mode = yield from self.choose(f"{shop} ordered {quantity} items. Ship by truck "
                                          "(fast, dear) or by rail (slow, cheap)?", list(MODES))
            self.shipped[mode] += 1
            hours = self.world.truck_hours if mode == "truck" else self.world.rail_hours
            self.send(shop, quantity, delay=hours)


class SupplyChain(World):
    """Warehouses, their shops and the shops' customers."""

    def setup(self, warehouses: int = 1, shops: int = 3, customers_per_shop: int = 3,
              buy_every_hours: float = 12.0, stock: int = 6, reorder_point: int = 3,
              order_hours: float = 24.0, truck_hours: float = 24.0, rail_hours: float = 72.0,
              max_tokens: int = 8) -> None:
        if warehouses < 1 or shops < 1:
            raise ValueError(f"world.params: need a warehouse and a shop, got {warehouses} "
                             f"warehouses and {shops} shops")
        self.reorder_point, self.order_hours = reorder_point, order_hours
        self.buy_every_hours = buy_every_hours
        self.truck_hours, self.rail_hours = truck_hours, rail_hours
        self.warehouses = [self.add(Warehouse(f"warehouse{w}", "You run a regional warehouse.",
                                              choice_tokens=max_tokens))
                           for w in range(warehouses)]
        self.shops = []
        for s in range(shops):
            shop = self.add(Shop(f"shop{s}", f"You run shop number {s}, a small store.",
                                 self.warehouses[s % warehouses].name, stock,
                                 choice_tokens=max_tokens))
            self.shops.append(shop)
            shop.customers = customers_per_shop
            for c in range(customers_per_shop):
                self.add(Customer(f"customer{s}-{c}", shop.name, buy_every_hours))

    def metrics(self) -> dict:
        return {**super().metrics(), "sold": sum(s.sold for s in self.shops),
                "missed_sales": sum(s.missed for s in self.shops),
                "discounts": sum(s.discounts for s in self.shops),
                **{f"shipped_by_{m}": sum(w.shipped[m] for w in self.warehouses) for m in MODES}}
